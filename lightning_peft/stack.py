"""Several tuners on one model: ``inject(model, [LoRAConfig(...), BitFitConfig()])``.

A :class:`TunerStack` is itself a tuner config (method ``"stack"``) holding its members in injection order,
so everything that takes a config (``inject``, the ``PEFT`` callback, YAML recipes, checkpoint metadata)
takes a stack too. Members are injected one after the other; two members that want to wrap the same module
collide, which is an error naming the module (see :func:`lightning_peft.targeting.find_modules`), and
:func:`lightning_peft.inject` then takes every member out again, so a failed stack leaves the model as it was.

What works on a stack: ``trainable_state_dict`` / adapter-only checkpoints / resume (the union of the
members' tensors), ``disable_adapters`` (every member off), ``merge`` (of the mergeable members; the others
are refused by name), ``unload``, and export when every member has a format.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_peft.config import TunerConfig, config_from_dict, register_tuner

__all__ = ["TunerStack"]


@register_tuner("stack")
@dataclass(kw_only=True)
class TunerStack(TunerConfig):
    """Tuners applied together, in order.

    Attributes:
        configs: the member configs (at least two different tuners; dicts in the ``to_dict`` form are
            accepted, as YAML recipes give them). ``modules_to_save`` belongs on the members.

    Example::

        TunerStack(configs=[LoRAConfig(r=8, target_modules=["query", "value"]), BitFitConfig()])
    """

    configs: list[TunerConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "layers"):
            if getattr(self, name) is not None:
                raise ValueError(f"TunerStack.{name} must be None: give it to the member config it is for")
        if isinstance(self.configs, TunerConfig) or not isinstance(self.configs, (list, tuple)):
            raise TypeError(f"TunerStack.configs must be a list of tuner configs, got {self.configs!r}")
        members: list[TunerConfig] = []
        for item in self.configs:
            config = config_from_dict(item) if isinstance(item, dict) else item
            if not isinstance(config, TunerConfig):
                raise TypeError(
                    f"TunerStack.configs holds {type(item).__name__}; expected tuner configs such as "
                    "LoRAConfig(...) or {'method': 'lora', ...}"
                )
            members += config.members()  # a stack inside a stack is flattened
        if not members:
            raise ValueError("TunerStack.configs is empty; give one or more tuner configs")
        self.configs = members

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return all(c.identity_at_init for c in self.configs)

    def members(self) -> list[TunerConfig]:
        return list(self.configs)

    def __iter__(self) -> Iterator[TunerConfig]:
        return iter(self.configs)

    def __len__(self) -> int:
        return len(self.configs)

    def __getitem__(self, index: int) -> TunerConfig:
        return self.configs[index]

    def apply(self, model: nn.Module) -> list[str]:
        changed: list[str] = []
        for config in self.configs:
            changed += config.apply(model)
        return changed

    @contextlib.contextmanager
    def disabled(self, model: nn.Module) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for config in self.configs:
                stack.enter_context(config.disabled(model))
            yield

    def remove(self, model: nn.Module) -> None:
        for config in self.configs:
            config.remove(model)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["configs"] = [c.to_dict() for c in self.configs]
        return out

    @property
    def method_names(self) -> list[str]:
        return [c.method for c in self.configs]
