"""LoRA <-> Hugging Face PEFT ``peft_type="LORA"``.

Parameter names already agree (``lora_A.weight``, ``lora_B.weight``, ``lora_embedding_A``,
``lora_embedding_B``), so only ``adapter_config.json`` needs translating:

==================  ===============================  ==============================================
ours                peft                             notes
==================  ===============================  ==============================================
``r``               ``r``
``alpha``           ``lora_alpha``                   written as an int when integral
``dropout``         ``lora_dropout``
``use_rslora``      ``use_rslora``
``init``            ``init_lora_weights``            ``"gaussian"`` or ``True``; irrelevant once loaded
targets             ``target_modules``               our list/regex when peft matches the same modules,
                                                     otherwise the explicit module names
(layer type)        ``fan_in_fan_out``               True for GPT-2 ``Conv1D`` targets; both libraries
                                                     read the layout from the layer, so only a warning
``modules_to_save`` ``modules_to_save``              explicit module names
==================  ===============================  ==============================================

Refused on import (they compute something else): DoRA, bias training (``bias`` other than ``"none"``,
``lora_bias``), per-module ``rank_pattern`` / ``alpha_pattern``, initialisations that rewrite the base
weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), and every other set option we do not read.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_peft.export.hf_peft import register_peft_format
from lightning_peft.targeting import matches
from lightning_peft.tuners.lora import LoRAConfig, LoRAEmbedding, LoRALinear

__all__ = ["LoRAFormat"]

#: peft initialisations that change the base weights, so the saved adapter needs a modified base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class LoRAFormat:
    method = "lora"
    peft_type = "LORA"
    handled_fields = frozenset(
        {
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "init_lora_weights",
            "target_modules",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
            "fan_in_fan_out",
            "modules_to_save",
            "bias",
            "use_dora",
            "lora_bias",
        }
    )

    def adapter_modules(self, root: nn.Module) -> list[str]:
        return [n for n, m in root.named_modules() if isinstance(m, (LoRALinear, LoRAEmbedding))]

    def to_peft_config(
        self, config: Any, root: nn.Module, adapters: list[str], modules_to_save: list[str]
    ) -> dict[str, Any]:
        assert isinstance(config, LoRAConfig)
        linear = [m for n, m in root.named_modules() if n in adapters and isinstance(m, LoRALinear)]
        alpha = config.alpha
        return {
            "r": config.r,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
            "lora_dropout": config.dropout,
            "use_rslora": config.use_rslora,
            "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
            "target_modules": _targets_for_peft(config, root, adapters),
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "fan_in_fan_out": bool(linear) and all(m.fan_in_fan_out for m in linear),
            "modules_to_save": modules_to_save or None,
            "bias": "none",
            "use_dora": False,
            "lora_bias": False,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    def from_peft_config(self, data: Mapping[str, Any], root: nn.Module) -> LoRAConfig:
        refuse = []
        if data.get("use_dora"):
            refuse.append("use_dora=True (DoRA's magnitude vector and weight normalisation)")
        if data.get("bias", "none") != "none" or data.get("lora_bias"):
            refuse.append(f"bias={data.get('bias')!r} / lora_bias={data.get('lora_bias')!r} (trained biases)")
        init = data.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            refuse.append(f"init_lora_weights={init!r} (it rewrites the base weights)")
        if refuse:
            raise ValueError(
                "this LoRA adapter uses option(s) lightning-peft's LoRA does not implement: "
                + "; ".join(refuse)
            )
        layers = data.get("layers_to_transform")
        modules_to_save = [m for m in data.get("modules_to_save") or [] if _exists(root, m)]
        return LoRAConfig(
            r=int(data["r"]),
            alpha=float(data.get("lora_alpha", 8)),
            dropout=float(data.get("lora_dropout") or 0.0),
            use_rslora=bool(data.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "kaiming",
            target_modules=data.get("target_modules"),
            exclude_modules=data.get("exclude_modules"),
            layers=[layers] if isinstance(layers, int) else layers,
            # peft's task models add their head names (e.g. "classifier" and "score"); keep those present.
            modules_to_save=modules_to_save or None,
        )

    def check_loaded(self, data: Mapping[str, Any], root: nn.Module) -> None:
        flag = bool(data.get("fan_in_fan_out", False))
        odd = [n for n, m in root.named_modules() if isinstance(m, LoRALinear) and m.fan_in_fan_out != flag]
        if odd:
            warnings.warn(
                f"adapter_config.json says fan_in_fan_out={flag} but {len(odd)} target layer(s) store their "
                f"weight the other way (e.g. {odd[0]}); like peft, the layout is taken from the layer",
                stacklevel=3,
            )


def _targets_for_peft(config: LoRAConfig, root: nn.Module, adapters: list[str]) -> list[str] | str:
    """Our own pattern when peft's matching (same rules: list = names or dotted suffixes, str =
    full-match regex) selects exactly the modules we adapted; otherwise the explicit names."""
    pattern = config.target_modules
    if isinstance(pattern, (list, str)) and pattern != "all-linear" and not config.layers:
        inside = tuple(f"{a}." for a in adapters)
        names = [n for n, _ in root.named_modules() if n and not n.startswith(inside)]
        if {n for n in names if matches(n, pattern)} == set(adapters):
            return pattern
    return sorted(adapters)


def _exists(root: nn.Module, name: str) -> bool:
    return any(matches(n, [name]) for n, _ in root.named_modules() if n)


register_peft_format(LoRAFormat())
