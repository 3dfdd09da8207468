"""The Hugging Face PEFT adapter layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

``peft.PeftModel.from_pretrained(base, folder)`` loads what :func:`export_peft` writes, and
:func:`import_peft` loads what peft's ``save_pretrained`` writes. What is generic lives here (files, key
prefixes, the split between the Hugging Face model and the rest of a LightningModule, refusing options
we cannot reproduce); what is per method (config fields, parameter names) lives in one
:class:`PeftFormat` per method, registered with :func:`register_peft_format` (LoRA: ``export/lora.py``;
prompt tuning, P-tuning and prefix tuning: ``export/prompt.py``, whose tensors peft names differently and
which therefore also define the optional ``to_peft_weights`` / ``from_peft_weights``).

Example::

    from lightning_peft.export import export_peft, import_peft

    export_peft(lit_module, "out/adapter", module="backbone", base_model_name_or_path="./my-bert")
    peft_model = peft.PeftModel.from_pretrained(AutoModel.from_pretrained("./my-bert"), "out/adapter")

    model = AutoModel.from_pretrained("./my-bert")
    import_peft(model, "adapter-saved-by-peft")       # injects our LoRA and loads the weights
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightning_peft.api import get_config, inject, load_trainable_state_dict, unload
from lightning_peft.config import TunerConfig
from lightning_peft.layers import TRAINABLE_ATTR, iter_trainable_parameters

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "EXTRA_WEIGHTS",
    "PeftFormat",
    "export_peft",
    "import_peft",
    "register_peft_format",
    "split_trainable",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Trainable tensors outside the exported Hugging Face model (a LightningModule's own head), keyed by
#: their names in the object passed to the export; HF PEFT has no place for them.
EXTRA_WEIGHTS = "extra_tensors.safetensors"
#: peft prefixes every adapter key with the path of the user's model inside ``PeftModel``.
PEFT_KEY_PREFIX = "base_model.model."

#: peft config fields that do not change what the adapter computes once its weights are loaded.
NEUTRAL_FIELDS = frozenset(
    {
        "peft_type",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "task_type",
        "inference_mode",
        "auto_mapping",
        "megatron_core",
        "qalora_group_size",
    }
)


class PeftFormat(Protocol):
    """How one of our methods maps onto one HF PEFT ``peft_type``."""

    method: str  # our registered method name, e.g. "lora"
    peft_type: str  # peft's name, e.g. "LORA"
    handled_fields: frozenset[str]  # adapter_config.json fields this format reads

    def adapter_modules(self, root: nn.Module) -> list[str]:
        """Names (relative to ``root``) of the modules the tuner wrapped."""
        ...

    def to_peft_config(
        self, config: TunerConfig, root: nn.Module, adapters: list[str], modules_to_save: list[str]
    ) -> dict[str, Any]:
        """The method-specific fields of ``adapter_config.json``."""
        ...

    def from_peft_config(self, data: Mapping[str, Any], root: nn.Module) -> TunerConfig:
        """Our config from ``adapter_config.json`` (raise ``ValueError`` naming unsupported options)."""
        ...

    def check_loaded(self, data: Mapping[str, Any], root: nn.Module) -> None:
        """Consistency checks after injection (may warn)."""
        ...

    # Optional, for methods whose tensors peft stores under other names (prompt learning):
    # ``to_peft_weights(inside, root) -> {file key: tensor}`` and
    # ``from_peft_weights(weights, root) -> {our name relative to root: tensor}`` (called after injection;
    # ``weights`` has the ``base_model.model.`` prefix already removed).


_FORMATS: dict[str, PeftFormat] = {}


def register_peft_format(fmt: PeftFormat) -> PeftFormat:
    """Register ``fmt`` for its method (export) and its ``peft_type`` (import)."""
    _FORMATS[fmt.method] = fmt
    return fmt


def _by_peft_type(peft_type: str) -> PeftFormat:
    for fmt in _FORMATS.values():
        if fmt.peft_type == peft_type:
            return fmt
    known = ", ".join(sorted(f.peft_type for f in _FORMATS.values()))
    raise ValueError(f"peft_type {peft_type!r} cannot be imported yet; supported: {known}")


def _by_method(method: str) -> PeftFormat:
    try:
        return _FORMATS[method]
    except KeyError:
        known = ", ".join(sorted(_FORMATS))
        raise ValueError(
            f"the {method!r} tuner has no Hugging Face PEFT equivalent that loads the same weights "
            f"(exportable: {known}). Use lightning_peft.export.export_merged() for a plain model "
            "(LoRA, BitFit) or save lightning_peft.trainable_state_dict() with safetensors."
        ) from None


@dataclass
class TrainableSplit:
    """The trainable tensors of a model, split at the exported Hugging Face model ``root``."""

    root: nn.Module
    inside: dict[str, Tensor] = field(default_factory=dict)  # names relative to root
    outside: dict[str, Tensor] = field(default_factory=dict)  # names relative to the model passed


def split_trainable(model: nn.Module, module: str | None) -> TrainableSplit:
    """Resolve ``module`` (a dotted path inside ``model``, or None for ``model`` itself) and split the
    tuner's tensors into those inside it (prefix stripped) and the rest."""
    try:
        root = model.get_submodule(module) if module else model
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise ValueError(
            f"module={module!r}: {type(model).__name__} has no such submodule (children: {children})"
        ) from None
    split = TrainableSplit(root=root)
    prefix = f"{module}." if module else ""
    for name, p in iter_trainable_parameters(model):
        if name.startswith(prefix):
            split.inside[name[len(prefix) :]] = p.detach()
        else:
            split.outside[name] = p.detach()
    return split


def _to_cpu(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses non-contiguous and shared storage: save independent contiguous copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_extras(out_dir: Path, outside: Mapping[str, Tensor]) -> Path | None:
    """Write trainable tensors that live outside the exported model; None when there are none."""
    if not outside:
        return None
    path = out_dir / EXTRA_WEIGHTS
    save_file(_to_cpu(outside), str(path), metadata={"format": "pt", "producer": "lightning-peft"})
    return path


def _modules_to_save(root: nn.Module, adapters: list[str]) -> list[str]:
    """Fully trainable modules of ``root`` that are not part of an adapter (``modules_to_save``)."""
    inside = tuple(f"{a}." for a in adapters)
    return [
        n
        for n, m in root.named_modules()
        if n and getattr(m, TRAINABLE_ATTR, None) is True and n not in adapters and not n.startswith(inside)
    ]


def export_peft(
    model: nn.Module,
    out_dir: str | Path,
    *,
    module: str | None = None,
    base_model_name_or_path: str | None = None,
) -> list[Path]:
    """Write the tuner of ``model`` in the Hugging Face PEFT layout.

    Args:
        model: the Hugging Face model with our tuner injected, or an object holding it (a LightningModule).
        out_dir: folder to write to (created).
        module: dotted path of the Hugging Face model inside ``model`` (``"backbone"``); adapter keys are
            written relative to it, as peft expects.
        base_model_name_or_path: recorded in ``adapter_config.json`` (peft only reads it when no base
            model object is passed to ``PeftModel.from_pretrained``).

    Returns:
        The files written: ``adapter_config.json``, ``adapter_model.safetensors`` and, when ``model`` has
        trainable tensors outside ``module`` (a LightningModule's own head), ``extra_tensors.safetensors``
        holding those under their names in ``model``.

    Raises:
        ValueError: no tuner, a method peft cannot load, or no adapter inside ``module``.
    """
    config = get_config(model)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no tuner injected: nothing to export")
    fmt = _by_method(config.method)
    split = split_trainable(model, module)
    adapters = fmt.adapter_modules(split.root)
    if not adapters:
        raise ValueError(
            f"no {config.method} adapter inside module={module!r}; pass the path of the model that holds them"
        )
    to_save = _modules_to_save(split.root, adapters)
    peft_config = {
        "peft_type": fmt.peft_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "task_type": None,
        "inference_mode": True,
        **fmt.to_peft_config(config, split.root, adapters, to_save),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    to_peft = getattr(fmt, "to_peft_weights", None)  # optional: formats whose names differ from ours
    weights = (
        to_peft(split.inside, split.root)
        if to_peft
        else {PEFT_KEY_PREFIX + k: v for k, v in split.inside.items()}
    )
    save_file(_to_cpu(weights), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    written = [out / ADAPTER_CONFIG, out / ADAPTER_WEIGHTS]
    extra = save_extras(out, split.outside)
    return [*written, extra] if extra else written


def read_peft_config(in_dir: str | Path) -> dict[str, Any]:
    path = Path(in_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a Hugging Face PEFT adapter folder")
    return json.loads(path.read_text())


def read_peft_weights(in_dir: str | Path) -> dict[str, Tensor]:
    """The adapter tensors of a peft folder, with the ``base_model.model.`` prefix removed."""
    folder = Path(in_dir)
    if (folder / ADAPTER_WEIGHTS).is_file():
        raw = load_file(str(folder / ADAPTER_WEIGHTS))
    elif (folder / "adapter_model.bin").is_file():
        raw = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has neither {ADAPTER_WEIGHTS} nor adapter_model.bin")
    return {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in raw.items()}


def check_fields(fmt: PeftFormat, data: Mapping[str, Any]) -> None:
    """Refuse every option the format does not read and that is set (not None/False/empty)."""
    unknown = {k: v for k, v in data.items() if k not in fmt.handled_fields and k not in NEUTRAL_FIELDS and v}
    if unknown:
        listed = ", ".join(f"{k}={v!r}" for k, v in sorted(unknown.items()))
        raise ValueError(
            f"this {fmt.peft_type} adapter uses option(s) lightning-peft cannot reproduce: {listed}. "
            "Loading it would compute something else than peft does, so it is refused."
        )


def import_peft(model: nn.Module, in_dir: str | Path, *, module: str | None = None) -> TunerConfig:
    """Inject the tuner described by a peft ``adapter_config.json`` into ``model`` and load its weights.

    Args:
        model: the base Hugging Face model (no tuner yet), or an object holding it at ``module``.
        in_dir: a folder written by peft's ``save_pretrained`` (or by :func:`export_peft`).
        module: dotted path of the Hugging Face model inside ``model``.

    Returns:
        The config that was injected.

    Raises:
        ValueError: an unsupported ``peft_type`` or option (named), or weights that do not match.
    """
    data = read_peft_config(in_dir)
    fmt = _by_peft_type(str(data.get("peft_type")))
    check_fields(fmt, data)
    root = model.get_submodule(module) if module else model
    config = fmt.from_peft_config(data, root)
    weights = read_peft_weights(in_dir)
    inject(root, config)
    from_peft = getattr(fmt, "from_peft_weights", None)
    if from_peft:
        weights = from_peft(weights, root)
    fmt.check_loaded(data, root)
    try:
        load_trainable_state_dict(root, weights, strict=True)
    except ValueError as err:
        unload(root, merge_weights=False)  # leave the model as it was given
        raise ValueError(f"{in_dir}: {err}") from None
    return config
