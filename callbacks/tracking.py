"""Checkpoint sizes and W&B artifacts for the PEFT callback's tracking (see :mod:`.peft`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning_peft.config import TunerConfig

__all__ = ["log_artifact", "size_on_disk", "wants_artifact"]


def size_on_disk(path: Path) -> int:
    if path.is_dir():  # DeepSpeed and FSDP sharded checkpoints are folders
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size if path.exists() else 0


def wants_artifact(logger: Any) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    # WandbLogger(log_model=...) already logs ModelCheckpoint's (adapter-only) files: do not log twice.
    return isinstance(logger, WandbLogger) and not getattr(logger, "_log_model", False)


def log_artifact(logger: Any, path: Path, size: int, step: int, config: TunerConfig) -> None:
    import wandb

    run = logger.experiment
    artifact = wandb.Artifact(
        name=f"adapter-{run.id}",
        type="model",
        metadata={"peft_config": config.to_dict(), "bytes": size, "global_step": step, "file": path.name},
    )
    if path.is_dir():
        artifact.add_dir(os.fspath(path), name=path.name)
    else:
        artifact.add_file(os.fspath(path), name=path.name)
    run.log_artifact(artifact, aliases=["latest", f"step-{step}"])
