"""``lightning-peft``: LightningCLI over any LightningModule / DataModule, plus a fit summary.

Usage::

    lightning-peft fit --config configs/minilm_lora.yaml
    lightning-peft fit --config configs/minilm_lora.yaml --ckpt_path last      # resume after a crash/kill
    lightning-peft fit --config configs/minilm_lora.yaml --trainer.max_epochs 5  # override anything
    lightning-peft export --checkpoint last.ckpt --base minilm --module backbone --format peft --out DIR

``fit`` validates once before training and once after, then prints what a practitioner asks first:
trainable / total parameters, checkpoint size on disk, validation metrics before and after. The same
summary is written as JSON next to the checkpoints and logged to the run's loggers.

``export`` is dispatched before LightningCLI parses anything (it needs no Trainer), so LightningCLI's own
parser does not know it; ``lightning-peft --help`` lists it after the Trainer subcommands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

import lightning_peft  # noqa: F401  (registers the tuners for class_path resolution)
from lightning_peft.api import param_summary

__all__ = ["PEFTCLI", "main"]


class PEFTCLI(LightningCLI):
    """LightningCLI whose ``fit`` reports the validation metrics before and after training."""

    def before_fit(self) -> None:
        self._before = self._validate() if self._has_val() else {}

    def after_fit(self) -> None:
        after = self._validate() if self._has_val() else {}
        self._report(self._before, after)

    def _has_val(self) -> bool:
        return (self.datamodule is not None and hasattr(self.datamodule, "val_dataloader")) or hasattr(
            self.model, "val_dataloader"
        )

    def _validate(self) -> dict[str, float]:
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        return {k: float(v) for k, v in (results[0] if results else {}).items()}

    @rank_zero_only
    def _report(self, before: dict[str, float], after: dict[str, float]) -> None:
        summary = param_summary(self.model)
        ckpt = self.trainer.checkpoint_callback
        path = ""
        if isinstance(ckpt, ModelCheckpoint):
            path = ckpt.last_model_path or ckpt.best_model_path
        size = os.path.getsize(path) if path and os.path.exists(path) else None
        report: dict[str, Any] = {
            "trainable_params": summary.trainable,
            "total_params": summary.total,
            "trainable_percent": round(summary.percent, 4),
            "checkpoint": path,
            "checkpoint_bytes": size,
            "before": before,
            "after": after,
        }
        lines = [
            "",
            "==================== lightning-peft summary ====================",
            f"parameters   : {summary}",
            f"checkpoint   : {_mb(size)}  {path}" if path else "checkpoint   : none written",
        ]
        keys = sorted(set(before) | set(after))
        width = max([13, *map(len, keys)])
        for key in keys:
            b, a = before.get(key), after.get(key)
            lines.append(f"{key:<{width}}: {_fmt(b)} before -> {_fmt(a)} after")
        lines.append("=" * 64)
        print("\n".join(lines), flush=True)
        if path:
            out = Path(path).parent / "summary.json"
            out.write_text(json.dumps(report, indent=2))
        for logger in self.trainer.loggers:
            logger.log_hyperparams({"summary": report})


def _mb(size: int | None) -> str:
    return "?" if size is None else f"{size / 2**20:.2f} MB"


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:.4f}"


#: Shown at the end of ``lightning-peft --help``, laid out like LightningCLI's own subcommand list.
EXPORT_HELP = """other subcommands:
  export              Turn an adapter-only checkpoint of the PEFT callback into
                      a Hugging Face PEFT adapter folder or a merged model.
                      For its arguments: lightning-peft export --help
  pet                 Run the PET / iPET pipeline (pattern models, ensemble
                      soft labels, distillation) from one YAML file.
                      For its arguments: lightning-peft pet --help"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's formatter that keeps the epilog's line breaks (argparse re-wraps them otherwise)."""


def main(args: list[str] | None = None) -> None:
    """Console entry point ``lightning-peft``: ``export`` goes to :mod:`lightning_peft.export_cli`, every
    other subcommand (``fit``, ``validate``, ...) to LightningCLI."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["pet"]:
        from lightning_peft.prompting.pet import main as pet_main

        pet_main(argv[1:])
        return
    if argv[:1] == ["export"]:
        from lightning_peft.export_cli import main as export_main

        export_main(argv[1:])
        return
    PEFTCLI(
        model_class=None,
        datamodule_class=None,
        save_config_kwargs={"overwrite": True},
        # Keys that are not subcommand names configure the top-level parser only, so the subcommands'
        # own --help stays as LightningCLI formats it.
        parser_kwargs={"epilog": EXPORT_HELP, "formatter_class": _HelpFormatter},
        args=args,
    )


if __name__ == "__main__":
    main()
