"""``lightning-peft``: LightningCLI over any LightningModule / DataModule, plus a fit summary.

Usage::

    lightning-peft fit --config configs/minilm_lora.yaml
    lightning-peft fit --config configs/minilm_lora.yaml --ckpt_path last      # resume after a crash/kill
    lightning-peft fit --config configs/minilm_lora.yaml --trainer.max_epochs 5  # override anything
    lightning-peft export --checkpoint last.ckpt --base minilm --module backbone --format peft --out DIR

``--ckpt_path`` with a checkpoint whose model hyperparameters differ from the config's model is refused with
the differing fields named (LightningCLI would otherwise build the checkpoint's model without a word);
``--model_from_ckpt true`` takes the checkpoint's values instead and prints what it changed. A corrupt
checkpoint file is an error that names the file and says what is wrong with it.

Errors in the command line or the config (and in the checkpoint given) are printed as one message;
``--print-traceback`` (or ``LIGHTNING_PEFT_TRACEBACK=1``) shows the full traceback instead.

``fit`` validates once before training and once after, then prints what a practitioner asks first:
trainable / total parameters, checkpoint size on disk, validation metrics before and after. The same
summary is written as JSON next to the checkpoints and logged to the run's loggers.

``export`` is dispatched before LightningCLI parses anything (it needs no Trainer), so LightningCLI's own
parser does not know it; ``lightning-peft --help`` lists it after the Trainer subcommands.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError, DefaultHelpFormatter, Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

import lightning_peft  # noqa: F401  (registers the tuners for class_path resolution)
from lightning_peft.api import ParamSummary
from lightning_peft.checkpoint import CheckpointFileError, read_checkpoint

__all__ = ["PEFTCLI", "ConfigError", "main", "trained_param_summary"]


class ConfigError(ValueError):
    """The command line, the config or the checkpoint given to ``--ckpt_path`` is wrong (a user error)."""


class PEFTCLI(LightningCLI):
    """LightningCLI whose ``fit`` reports the validation metrics before and after training, and which refuses
    a ``--ckpt_path`` whose model differs from the config's (``--model_from_ckpt true`` adopts it)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--model_from_ckpt",
            type=bool,
            default=False,
            help="With --ckpt_path: build the model from the checkpoint's hyperparameters where they differ "
            "from the config (each change is printed). Default: refuse such a checkpoint, naming the fields.",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        with _as_config_error():
            super().parse_arguments(parser, args)

    def instantiate_classes(self) -> None:
        with _as_config_error():
            super().instantiate_classes()

    def _parse_ckpt_path(self) -> None:
        """Compare the config's model with the one in ``--ckpt_path`` before LightningCLI overrides it.

        Replaces ``LightningCLI._parse_ckpt_path`` (Lightning 2.6), which merges the checkpoint's
        ``hyper_parameters`` into the config without a word.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        path = _resolve_ckpt_path(config.get("ckpt_path"), config)
        if path is None:
            return
        config["ckpt_path"] = str(path)  # Lightning restores exactly the file compared here
        weights_only = config.get("weights_only") is not False
        hint = "pass --weights_only false" if weights_only else ""
        checkpoint = read_checkpoint(path, weights_only=weights_only, trust_hint=hint)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            merged = self.parser.parse_object({subcommand: {"model": hparams}}, copy.deepcopy(self.config))
        except (SystemExit, ArgumentError, ValueError, TypeError) as err:
            raise ConfigError(
                f"the model hyperparameters stored in {path} do not fit this command's model options"
                + (f": {_core_message(str(err).strip())}" if not isinstance(err, SystemExit) else "")
            ) from None
        changes = _differences(config["model"], merged[subcommand]["model"])
        if changes and not config.get("model_from_ckpt"):
            raise ConfigError(
                f"--ckpt_path {path} holds a different model than the config:\n  "
                + "\n  ".join(changes)
                + "\nMake the config match the checkpoint, give a checkpoint of this model, or pass "
                "--model_from_ckpt true to build the checkpoint's model instead."
            )
        if changes:
            print(f"--model_from_ckpt: model built from {path}:\n  " + "\n  ".join(changes), file=sys.stderr)
        self.config = merged

    def before_fit(self) -> None:
        self._before = self._validate() if self._has_val() else {}

    def after_fit(self) -> None:
        trained = trained_param_summary(self.model, self.trainer.optimizers)  # before validate() runs
        after = self._validate() if self._has_val() else {}
        self._report(trained, self._before, after)

    def _has_val(self) -> bool:
        return (self.datamodule is not None and hasattr(self.datamodule, "val_dataloader")) or hasattr(
            self.model, "val_dataloader"
        )

    def _validate(self) -> dict[str, float]:
        results = self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        return {k: float(v) for k, v in (results[0] if results else {}).items()}

    @rank_zero_only
    def _report(self, summary: ParamSummary, before: dict[str, float], after: dict[str, float]) -> None:
        ckpts = [cb for cb in self.trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        path = next((cb.last_model_path for cb in ckpts if cb.last_model_path), "")
        best = next((cb.best_model_path for cb in ckpts if cb.monitor and cb.best_model_path), "")
        path = path or best
        size = os.path.getsize(path) if path and os.path.exists(path) else None
        report: dict[str, Any] = {
            "trainable_params": summary.trainable,
            "total_params": summary.total,
            "trainable_percent": round(summary.percent, 4),
            "checkpoint": path,
            "checkpoint_bytes": size,
            "best_checkpoint": best,
            "before": before,
            "after": after,
        }
        keys = sorted(set(before) | set(after))
        width = max([len("checkpoint"), *map(len, keys)]) + 1
        lines = [
            "",
            "==================== lightning-peft summary ====================",
            f"{'parameters':<{width}}: {summary}",
            f"{'checkpoint':<{width}}: " + (f"{_mb(size)}  {path}" if path else "none written"),
        ]
        if best and best != path:
            lines.append(f"{'best':<{width}}: {best}")
        for key in keys:
            b, a = before.get(key), after.get(key)
            lines.append(f"{key:<{width}}: {_fmt(b)} before -> {_fmt(a)} after")
        lines.append("=" * 64)
        print("\n".join(lines), flush=True)
        if path:
            _write_atomic(Path(path).parent / "summary.json", json.dumps(report, indent=2))
        for logger in self.trainer.loggers:
            logger.log_hyperparams({"summary": report})


def trained_param_summary(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> ParamSummary:
    """Parameters the run trains / all parameters (shared tensors counted once).

    A parameter is trained when it requires a gradient and, if optimizers exist, one of them holds it. This
    counts full fine-tuning (no tuner) as well as any tuner, unlike :func:`lightning_peft.param_summary`,
    which counts tuner-marked tensors only.
    """
    params = {id(p): p for p in model.parameters()}
    held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    trained = [p for key, p in params.items() if p.requires_grad and (not optimizers or key in held)]
    return ParamSummary(
        trainable=sum(p.numel() for p in trained), total=sum(p.numel() for p in params.values())
    )


@contextlib.contextmanager
def _as_config_error() -> Iterator[None]:
    """Turn an error raised while parsing or building the config's objects into a :class:`ConfigError`."""
    try:
        yield
    except (ValueError, TypeError, KeyError, ArgumentError) as err:
        if isinstance(err, ConfigError | CheckpointFileError):
            raise
        raise ConfigError(_core_message(str(err).strip()) or type(err).__name__) from err


_UNION_NOISE = ("Expected a <class 'NoneType'>", "Not a valid subclass of")


def _core_message(text: str) -> str:
    """The errors inside jsonargparse's "Does not validate against any of the Union subtypes" report, without
    the subtypes tried, the alternatives that could never fit (``None``, "not a subclass") and the value."""
    keyed = re.fullmatch(r'(Parser key "[^"]+":)\n(.*)', text, flags=re.S)
    if keyed:  # 'Parser key "model":' followed by the indented report
        core = _core_message(textwrap.dedent(keyed.group(2)))
        return f"{keyed.group(1)}\n" + textwrap.indent(core, "  ")
    if not text.startswith("Does not validate against any of the Union subtypes") or "\nErrors:" not in text:
        return text
    body = text.split("\nErrors:", 1)[1].split("\nGiven value type:", 1)[0]
    items = [item for item in re.split(r"\n  - ", "\n" + body.strip("\n")) if item.strip()]
    kept = [
        textwrap.dedent("  " + item).strip()
        for item in items
        if not item.lstrip("- ").startswith(_UNION_NOISE)
    ]
    return "\n".join(_core_message(item) for item in kept) if kept else text


def _resolve_ckpt_path(ckpt_path: str | None, config: Namespace) -> Path | None:
    """The file ``--ckpt_path`` names: a path as given, ``"last"`` as the newest ``last*.ckpt`` in the
    configured checkpoint folders, ``None`` for what Lightning resolves itself (``best``, ``hpc``, ...)."""
    if not ckpt_path or ckpt_path in ("best", "hpc") or str(ckpt_path).startswith("registry"):
        return None
    if ckpt_path != "last":
        return Path(ckpt_path)
    folders = []
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        init_args = getattr(callback, "init_args", None)
        dirpath = init_args.get("dirpath") if init_args is not None else None
        if dirpath:
            folders.append(Path(dirpath))
    candidates = [p for folder in folders if folder.is_dir() for p in folder.glob("last*.ckpt")]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _differences(ours: Namespace, theirs: Namespace) -> list[str]:
    """``"model.<field>: config <value>, checkpoint <value>"`` for every field that differs."""
    mine, other = _flatten(ours.as_dict()), _flatten(theirs.as_dict())
    keys = sorted(set(mine) | set(other))
    return [
        f"model.{k}: config {mine.get(k)!r}, checkpoint {other.get(k)!r}"
        for k in keys
        if mine.get(k) != other.get(k)
    ]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


TRACEBACK_ENV = "LIGHTNING_PEFT_TRACEBACK"


def main(args: list[str] | None = None) -> None:
    """Console entry point ``lightning-peft``: ``export`` goes to :mod:`lightning_peft.export_cli`, every
    other subcommand (``fit``, ``validate``, ...) to LightningCLI.

    A wrong command line, config or checkpoint prints ``lightning-peft: error: <message>`` and exits with
    status 2; ``--print-traceback`` (anywhere on the command line) or ``LIGHTNING_PEFT_TRACEBACK=1`` raises
    the error with its full traceback instead.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if args is None else list(args)
    show_traceback = "--print-traceback" in argv or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    if "--print-traceback" in argv:
        argv = [a for a in argv if a != "--print-traceback"]
        if args is None:
            sys.argv = [sys.argv[0], *argv]
        else:
            args = argv
    try:
        _dispatch(argv, args)
    except (ConfigError, CheckpointFileError) as err:
        if show_traceback:
            raise
        sys.stderr.write(f"lightning-peft: error: {err}\n(--print-traceback shows the full traceback)\n")
        raise SystemExit(2) from None


def _dispatch(argv: list[str], args: list[str] | None) -> None:
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
        # exit_on_error=False: parse errors raise, and main() prints them as one message.
        parser_kwargs={"epilog": EXPORT_HELP, "formatter_class": _HelpFormatter, "exit_on_error": False},
        args=args,
    )


if __name__ == "__main__":
    main()
