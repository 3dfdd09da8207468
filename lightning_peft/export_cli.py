"""``lightning-peft export``: turn an adapter-only training checkpoint into a Hugging Face PEFT adapter
folder or a merged plain model.

Usage::

    lightning-peft export --checkpoint outputs/run/checkpoints/last.ckpt --base minilm \\
        --module backbone --format peft --out exported/adapter
    lightning-peft export --checkpoint last.ckpt --base ./my-bert --module backbone --format merged \\
        --out exported/merged

The checkpoint is one written with the ``PEFT`` callback: its ``state_dict`` holds the tuner's tensors plus
``__lightning_peft__`` (the tuner config and a fingerprint of the frozen base). The base model is loaded
from ``--base`` (a local ``save_pretrained`` folder, or ``minilm`` for the bundled all-MiniLM-L6-v2; nothing
is downloaded) and checked against that fingerprint, so adapters are never exported onto the wrong base.
``--module`` is where the Hugging Face model sat inside the LightningModule (``self.backbone`` ->
``backbone``). Trained tensors outside it (a head of the LightningModule) go to
``extra_tensors.safetensors`` under their LightningModule names.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_peft.api import inject, load_trainable_state_dict
from lightning_peft.config import TunerConfig, config_from_dict
from lightning_peft.export import export_merged, export_peft
from lightning_peft.export.hf_peft import save_extras
from lightning_peft.fingerprint import base_fingerprint, compare_fingerprints
from lightning_peft.layers import META_KEY
from lightning_peft.targeting import matches

__all__ = ["ExportError", "build_parser", "export_checkpoint", "main"]


class ExportError(RuntimeError):
    """The checkpoint, the base model or the arguments do not fit together."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-peft export",
        description="Export an adapter-only checkpoint of the PEFT callback to the Hugging Face PEFT layout "
        "(adapter_config.json + adapter_model.safetensors) or to a merged model (save_pretrained).",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="the .ckpt written during training")
    parser.add_argument(
        "--base", required=True, help="base model: a local save_pretrained folder or 'minilm'"
    )
    parser.add_argument(
        "--module", required=True, help="path of the Hugging Face model in the LightningModule, e.g. backbone"
    )
    parser.add_argument("--format", choices=["peft", "merged"], default="peft")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument(
        "--auto-class",
        default="AutoModel",
        help="transformers class that loads --base the way training did (default AutoModel)",
    )
    parser.add_argument(
        "--no-verify-base",
        action="store_true",
        help="skip the check that --base is the model the adapters were trained on",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle arbitrary objects from the checkpoint (torch.load weights_only=False)",
    )
    return parser


def _load_checkpoint(path: Path, trust: bool) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as err:  # torch raises UnpicklingError subclasses and RuntimeErrors here
        if trust:
            raise
        raise ExportError(
            f"{path} holds objects beyond tensors and plain data ({type(err).__name__}); if you trust the "
            "file, add --trust-checkpoint"
        ) from err


def _load_base(base: str, auto_class: str) -> nn.Module:
    import transformers

    from lightning_peft.tasks.pretrained import resolve_pretrained_path

    cls = getattr(transformers, auto_class, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ExportError(f"--auto-class {auto_class!r} is not a transformers class with from_pretrained")
    try:
        path = resolve_pretrained_path(base)
    except (FileNotFoundError, ImportError) as err:
        raise ExportError(str(err)) from None
    return cls.from_pretrained(path).eval()


def _shell(module: str, base: nn.Module) -> nn.Module:
    """An empty module tree with ``base`` at ``module``, so names match the LightningModule's."""
    root = nn.Module()
    parent = root
    *parents, leaf = module.split(".")
    for part in parents:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    parent.add_module(leaf, base)
    return root


def _restrict(config: TunerConfig, shell: nn.Module) -> TunerConfig:
    """The config minus ``modules_to_save`` entries that live outside the Hugging Face model."""
    if not config.modules_to_save:
        return config
    names = [n for n, _ in shell.named_modules() if n]
    kept = [m for m in config.modules_to_save if any(matches(n, [m]) for n in names)]
    return dataclasses.replace(config, modules_to_save=kept or None)


def _verify_base(meta: dict[str, Any], shell: nn.Module, prefix: str) -> None:
    saved = {k: v for k, v in (meta.get("fingerprint") or {}).items() if k.startswith(prefix)}
    if not saved:
        raise ExportError(
            f"the checkpoint's base fingerprint has no tensor under {prefix!r}: is --module right? "
            f"Top-level names in it: {sorted({k.split('.')[0] for k in meta.get('fingerprint') or {}})}"
        )
    current = base_fingerprint(shell)
    problems = compare_fingerprints(saved, {k: v for k, v in current.items() if k in saved})
    if problems:
        raise ExportError(
            "--base is not the model these adapters were trained on:\n  "
            + "\n  ".join(problems)
            + "\n(--no-verify-base skips this check)"
        )


def export_checkpoint(
    checkpoint: Path,
    base: str,
    module: str,
    out: Path,
    *,
    fmt: str = "peft",
    auto_class: str = "AutoModel",
    verify_base: bool = True,
    trust_checkpoint: bool = False,
) -> list[Path]:
    """What ``lightning-peft export`` does; returns the files written."""
    loaded = _load_checkpoint(checkpoint, trust_checkpoint)
    state = dict(loaded.get("state_dict") or {})
    meta = loaded.get(META_KEY, state.pop(META_KEY, None))  # top level; inside state_dict in older files
    state.pop(META_KEY, None)
    if not meta or not meta.get("config"):
        raise ExportError(
            f"{checkpoint} is not an adapter-only checkpoint of the lightning_peft PEFT callback "
            f"(no {META_KEY!r} entry with a tuner config in its state_dict)"
        )
    config = config_from_dict(meta["config"])
    shell = _shell(module, _load_base(base, auto_class))
    prefix = f"{module}."
    if verify_base:
        _verify_base(meta, shell, prefix)
    inject(shell, _restrict(config, shell))
    inside = {k: v for k, v in state.items() if k.startswith(prefix)}
    outside = {k: v for k, v in state.items() if not k.startswith(prefix)}
    try:
        load_trainable_state_dict(shell, inside, strict=True)
    except ValueError as err:
        raise ExportError(f"{checkpoint}: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "peft":
        written = export_peft(shell, out, module=module, base_model_name_or_path=str(base))
    elif fmt == "merged":
        written = export_merged(shell, out, module=module)
    else:
        raise ExportError(f"--format {fmt!r}: choose 'peft' or 'merged'")
    extra = save_extras(out, outside)
    return [*written, extra] if extra else written


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``lightning-peft export`` (dispatched from :func:`lightning_peft.cli.main`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        written = export_checkpoint(
            args.checkpoint,
            args.base,
            args.module,
            args.out,
            fmt=args.format,
            auto_class=args.auto_class,
            verify_base=not args.no_verify_base,
            trust_checkpoint=args.trust_checkpoint,
        )
    except (ExportError, ValueError) as err:
        parser.exit(2, f"lightning-peft export: error: {err}\n")
    print(f"lightning-peft export ({args.format}) wrote to {args.out}:")
    for path in written:
        print(f"  {path.name}  ({path.stat().st_size / 2**20:.2f} MB)")
