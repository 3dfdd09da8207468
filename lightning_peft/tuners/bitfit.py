"""BitFit (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
Masked Language-models"): train only bias terms.

``biases`` picks which: ``"all"`` (every bias, LayerNorm included: 102,912 on BERT-base), ``"attention"``
(q/k/v/output projections), ``"ffn"`` (feed-forward projections), ``"layernorm"``, or a list of these.
The original biases are kept in a non-persistent buffer so :func:`lightning_peft.disable_adapters` can
show the base model's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lightning_peft.config import TunerConfig, check_choice, register_tuner
from lightning_peft.families import part_regex
from lightning_peft.layers import mark
from lightning_peft.targeting import find_modules, matches

__all__ = ["ORIGINAL_BIAS", "BitFitConfig"]

ORIGINAL_BIAS = "_lp_bias_orig"
_GROUPS = ("all", "attention", "ffn", "layernorm")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


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
        names = find_modules(model, pattern, exclude=self.exclude_modules, layers=self.layers)
        regexes = {
            g: part_regex(model, g, owner=f"BitFitConfig(biases={g!r})")
            for g in ("attention", "ffn")
            if g in groups
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
                ("layernorm" in groups and _is_norm(module))
                or any(matches(name, rx) for rx in regexes.values())
            ):
                module.register_buffer(ORIGINAL_BIAS, bias.detach().clone(), persistent=False)
                mark(module, ["bias"])
                chosen.append(name)
        if not chosen:
            raise ValueError(f"BitFitConfig(biases={self.biases!r}) found no bias parameter to train")
        return chosen
