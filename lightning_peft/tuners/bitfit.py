"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models"): train only bias terms.

``biases`` picks which: ``"all"`` (every bias, LayerNorm included: 102,912 on BERT-base), ``"attention"``
(q/k/v/output projections), ``"ffn"`` (feed-forward projections), ``"layernorm"``, or a list of these.
The original biases are kept in a non-persistent buffer so :func:`lightning_peft.disable_adapters` can
show the base model's behaviour. A model on the meta device (built for materialisation by Lightning) has
no bias values at injection: call :func:`record_original_biases` once its base weights are loaded;
``disable_adapters`` refuses it until then rather than restore meaningless biases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_peft.config import TunerConfig, check_choice, register_tuner
from lightning_peft.layers import mark
from lightning_peft.layouts import block_part_names
from lightning_peft.targeting import find_modules

__all__ = [
    "ORIGINAL_BIAS",
    "UNRECORDED_BIAS",
    "BitFitConfig",
    "check_original_biases",
    "record_original_biases",
]

ORIGINAL_BIAS = "_lp_bias_orig"
#: Plain attribute on a module whose bias was on the meta device at injection: its original value is
#: recorded by :func:`record_original_biases`, once there is one.
UNRECORDED_BIAS = "_lp_bias_unrecorded"
_GROUPS = ("all", "attention", "ffn", "layernorm")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def _unwrapped(name: str) -> str:
    """A module's name as the layout knows it: ``...query`` for ``...query.base_layer`` (wrapped by LoRA)."""
    while name.endswith(".base_layer"):
        name = name[: -len(".base_layer")]
    return name


@register_tuner("bitfit")
@dataclass(kw_only=True)
class BitFitConfig(TunerConfig):
    """Which biases train.

    Attributes:
        biases: ``"all"``, ``"attention"``, ``"ffn"``, ``"layernorm"`` or a list of them. Restrict further
            with ``target_modules`` (only biases of matching modules), ``exclude_modules`` and ``layers``.

    Example::

        BitFitConfig(biases=["attention", "layernorm"], modules_to_save=["classifier"])
    """

    biases: list[str] | str = field(default="all")

    def __post_init__(self) -> None:
        super().__post_init__()
        groups = [self.biases] if isinstance(self.biases, str) else list(self.biases)
        if not groups:
            raise ValueError(f"BitFitConfig.biases is empty; choose from {', '.join(_GROUPS)}")
        for g in groups:
            check_choice("BitFitConfig", "biases", g, list(_GROUPS))
        self.biases = groups[0] if len(groups) == 1 else groups

    def apply(self, model: nn.Module) -> list[str]:
        groups = {self.biases} if isinstance(self.biases, str) else set(self.biases)
        pattern = self.target_modules if self.target_modules is not None else r".+"
        # through_wrappers: a layer another tuner wrapped (LoRA) keeps its bias on its base_layer.
        names = find_modules(
            model, pattern, exclude=self.exclude_modules, layers=self.layers, through_wrappers=True
        )
        parts = {"attention": "attention_projections", "ffn": "ffn_projections"}
        owner = f"BitFitConfig(biases={self.biases!r})"
        grouped = {
            n
            for g in ("attention", "ffn")
            if g in groups
            for n in block_part_names(model, parts[g], owner=owner)
        }
        chosen: list[str] = []
        for name in names:
            module = model.get_submodule(name)
            bias = getattr(module, "bias", None)
            if not isinstance(bias, nn.Parameter) or "bias" not in dict(
                module.named_parameters(recurse=False)
            ):
                continue
            if "all" in groups or (
                ("layernorm" in groups and _is_norm(module)) or _unwrapped(name) in grouped
            ):
                if bias.is_meta:  # no values yet: to_empty() would leave a copy as uninitialised memory
                    setattr(module, UNRECORDED_BIAS, True)
                else:
                    module.register_buffer(ORIGINAL_BIAS, bias.detach().clone(), persistent=False)
                mark(module, ["bias"])
                chosen.append(name)
        if not chosen:
            raise ValueError(f"BitFitConfig(biases={self.biases!r}) found no bias parameter to train")
        return chosen

    # -- the optional tuner protocol (lightning_peft.config.TunerConfig) ---------------------------------
    @contextlib.contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        """The base model's biases while the block runs (trained ones restored on exit)."""
        check_original_biases(model)
        biased = [m for m in model.modules() if hasattr(m, ORIGINAL_BIAS)]
        trained = [m.bias.detach().clone() for m in biased]
        try:
            with torch.no_grad():
                for m in biased:
                    m.bias.copy_(getattr(m, ORIGINAL_BIAS))
            yield
        finally:
            with torch.no_grad():
                for m, b in zip(biased, trained, strict=True):
                    m.bias.copy_(b)

    def remove(self, model: nn.Module) -> None:
        """Forget the recorded originals (``unload``); the trained biases stay in the base layers."""
        for module in model.modules():
            module.__dict__.pop(UNRECORDED_BIAS, None)
            module._buffers.pop(ORIGINAL_BIAS, None)


def record_original_biases(model: nn.Module) -> list[str]:
    """Record the current biases of the BitFit modules injected on the meta device as their originals
    (what :func:`lightning_peft.disable_adapters` restores). Call it once the base weights are loaded, before
    training changes them. Returns the names of the modules recorded (biases recorded before are kept)."""
    recorded = []
    for name, module in model.named_modules():
        if module.__dict__.pop(UNRECORDED_BIAS, False):
            module.register_buffer(ORIGINAL_BIAS, module.bias.detach().clone(), persistent=False)
            recorded.append(name)
    return recorded


def check_original_biases(model: nn.Module) -> None:
    """Raise when BitFit biases of ``model`` have no recorded original (injected on the meta device)."""
    missing = [name for name, m in model.named_modules() if getattr(m, UNRECORDED_BIAS, False)]
    if missing:
        raise ValueError(
            f"the original biases of {len(missing)} BitFit module(s) (e.g. {', '.join(missing[:3])}) were "
            "not recorded: the model was on the meta device at injection. Load the base weights, then call "
            "lightning_peft.tuners.bitfit.record_original_biases(model) before training"
        )
