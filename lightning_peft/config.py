"""Tuner configs: one dataclass per method, validated on construction, registered by name.

Every config is a keyword-only dataclass. ``__post_init__`` validates fields with messages that name the
field and the allowed values, and :func:`config_from_dict` refuses unknown keys instead of dropping them, so
a typo in a YAML recipe (``rank: 8`` for ``r: 8``) is an error, not a silently different run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "TunerConfig",
    "available_tuners",
    "config_from_dict",
    "get_tuner_config",
    "register_tuner",
]

_TUNERS: dict[str, type[TunerConfig]] = {}
C = TypeVar("C", bound="type[TunerConfig]")


def register_tuner(name: str) -> Callable[[C], C]:
    """Class decorator registering a :class:`TunerConfig` subclass as method ``name``."""

    def wrap(cls: C) -> C:
        if name in _TUNERS and _TUNERS[name] is not cls:
            raise ValueError(f"tuner {name!r} is already registered by {_TUNERS[name].__qualname__}")
        cls.method = name
        _TUNERS[name] = cls
        return cls

    return wrap


def available_tuners() -> list[str]:
    """Names of all registered tuning methods."""
    return sorted(_TUNERS)


def get_tuner_config(method: str) -> type[TunerConfig]:
    """The config class of ``method``; an unknown name lists the known ones."""
    try:
        return _TUNERS[method]
    except KeyError:
        raise ValueError(
            f"Unknown tuning method {method!r}{_did_you_mean(method, _TUNERS)}. "
            f"Known methods: {', '.join(available_tuners())}."
        ) from None


def config_from_dict(data: dict[str, Any]) -> TunerConfig:
    """Build a config from ``{"method": "lora", **fields}`` (the :meth:`TunerConfig.to_dict` form) or
    from ``{"class_path": "lightning_peft.LoRAConfig", "init_args": {...}}`` (the LightningCLI form)."""
    data = dict(data)
    if "class_path" in data:
        cls = _import_config_class(str(data["class_path"]))
        return cls.from_dict(dict(data.get("init_args") or {}))
    if "method" not in data:
        raise ValueError(f"a tuner config dict needs a 'method' key (one of {', '.join(available_tuners())})")
    cls = get_tuner_config(data.pop("method"))
    return cls.from_dict(data)


def _import_config_class(class_path: str) -> type[TunerConfig]:
    import importlib

    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(
            f"cannot import tuner config class_path {class_path!r}; known configs: "
            + ", ".join(f"lightning_peft.{c.__name__}" for c in _TUNERS.values())
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, TunerConfig)):
        raise ValueError(f"class_path {class_path!r} is not a TunerConfig subclass")
    return cls


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


@dataclass(kw_only=True)
class TunerConfig:
    """Fields every tuner shares: where it goes and what else trains.

    Attributes:
        target_modules: which modules to adapt. A list matches exact names or dotted suffixes
            (``["query", "value"]`` matches ``encoder.layer.3.attention.self.query``); a string is a
            full-match regular expression over module names; ``"all-linear"`` is every linear layer but the
            output head. ``None`` means the method's default for the detected model family.
        exclude_modules: names, suffixes or a regex (same rules) removed from the matches.
        layers: keep only matches inside these transformer-block indices (``[10, 11]``).
        modules_to_save: modules trained fully next to the adapters (a freshly initialised task head such
            as ``["classifier"]``), matched like ``target_modules`` lists.
    """

    method: ClassVar[str] = "base"
    #: Whether an untrained tuner leaves the model's outputs exactly unchanged. Methods that add virtual
    #: tokens or prefix keys cannot (the extra positions change attention); the contract tests skip that
    #: item for them.
    identity_at_init: ClassVar[bool] = True

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers: list[int] | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            if not self.target_modules:
                raise ValueError("target_modules is an empty list; give names, a regex, or 'all-linear'")
            self.target_modules = list(self.target_modules)
        if self.layers is not None:
            if any((not isinstance(i, int)) or i < 0 for i in self.layers):
                raise ValueError(f"layers must be non-negative block indices, got {self.layers}")
            self.layers = sorted(set(self.layers))
        if isinstance(self.modules_to_save, str):  # one name, not its characters
            self.modules_to_save = [self.modules_to_save]
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
            if not all(isinstance(n, str) and n for n in self.modules_to_save):
                raise ValueError(f"modules_to_save must be module names, got {self.modules_to_save!r}")

    # -- what a method implements -------------------------------------------------------------------
    def apply(self, model: nn.Module) -> list[str]:
        """Inject this method into ``model`` in place; return the names of the modules it changed."""
        raise NotImplementedError(f"{type(self).__name__} does not implement apply()")

    # -- optional protocol: what a tuner does beyond its modules (shared code calls these, never names a
    # -- tuner). The defaults do nothing, which is right for every tuner that only adds modules.
    def members(self) -> list[TunerConfig]:
        """The configs this one injects: itself, or a :class:`~lightning_peft.stack.TunerStack`'s members."""
        return [self]

    def disabled(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """Extra work of :func:`lightning_peft.disable_adapters` for state the tuner changed in base modules
        (BitFit puts the original biases back); adapter modules are switched off through ``disabled``."""
        return contextlib.nullcontext()

    def remove(self, model: nn.Module) -> None:
        """Extra clean-up of :func:`lightning_peft.unload` (bookkeeping left on base modules)."""

    def checkpoint_record(self, model: nn.Module) -> dict[str, Any] | None:
        """JSON-safe facts an adapter-only checkpoint must carry to rebuild this tuner's modules beyond what
        the config says (K-Adapter: knowledge adapters added after injection); ``None``: nothing."""
        return None

    def restore_record(self, model: nn.Module, record: dict[str, Any]) -> None:
        """Rebuild modules from :meth:`checkpoint_record`'s output before a checkpoint's tensors load."""

    # -- serialisation --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict with the method name; inverse of :func:`config_from_dict`."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TunerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in names]
        if unknown:
            hints = "".join(f"\n  {k!r}{_did_you_mean(k, names)}" for k in unknown)
            raise ValueError(
                f"{cls.__name__} got unknown field(s):{hints}\nValid fields: {', '.join(sorted(names))}"
            )
        return cls(**data)

    def diff(self, other: TunerConfig) -> list[str]:
        """Human-readable differences between two configs (empty when they are equal)."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def check_choice(owner: str, name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raise a ValueError naming ``owner.name`` and the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(
            f"{owner}.{name}={value!r} is not valid{_did_you_mean(str(value), map(str, allowed))}; "
            f"choose one of {', '.join(map(repr, allowed))}"
        )


def check_positive(owner: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise a ValueError when a numeric field is not positive (or negative, with ``allow_zero``), or is
    not a number at all (``alpha="16"`` from a hand-written dict)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{owner}.{name} must be a number, got {value!r} ({type(value).__name__})")
    bad = value < 0 if allow_zero else value <= 0
    if bad or isinstance(value, bool):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}.{name} must be {bound}, got {value!r}")


def default_list(*items: str) -> list[str]:
    """A dataclass default factory for a list field."""
    return field(default_factory=lambda: list(items))
