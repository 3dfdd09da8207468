"""Which modules a tuner touches.

Rules (shared by ``target_modules``, ``exclude_modules`` and ``modules_to_save``):

* a list matches a module whose name equals an entry or ends with ``"." + entry``;
* a string is a regular expression that must match the whole name (``re.fullmatch``);
* ``"all-linear"`` is every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output head;
* ``layers=[i, ...]`` keeps matches inside transformer block ``i`` (the first integer in the name).

A pattern that matches nothing is an error listing the closest module names, because a typo that
silently adapts nothing is the most expensive bug in fine-tuning.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn

from lightning_peft.layers import TRAINABLE_ATTR, Adapter

__all__ = ["ALL_LINEAR", "HEAD_NAMES", "block_index", "find_modules", "linear_types", "matches"]

ALL_LINEAR = "all-linear"
#: Path components that name an output head; ``all-linear`` never adapts them.
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "cls", "head", "output_layer"})

Pattern = Sequence[str] | str


def linear_types() -> tuple[type[nn.Module], ...]:
    """``nn.Linear`` and, when transformers is installed, its GPT-2 style ``Conv1D``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency, but the core does not need it
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def matches(name: str, pattern: Pattern) -> bool:
    """Whether module ``name`` matches ``pattern`` (list: exact or suffix; str: full-match regex)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern)


def block_index(name: str) -> int | None:
    """The transformer block a module belongs to: the first all-digit component of its name."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _is_wrapper(module: nn.Module) -> bool:
    """An injected layer that wraps a base layer (LoRA, a bottleneck adapter, ...)."""
    return isinstance(module, Adapter) and hasattr(module, "base_layer")


def _candidates(model: nn.Module, *, through_wrappers: bool = False) -> list[tuple[str, nn.Module]]:
    """Module names a tuner may target: not the root, not inside an already injected layer (except, with
    ``through_wrappers``, a wrapper's ``base_layer`` subtree: BitFit trains a LoRA-wrapped layer's bias)."""
    out: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    reopened: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if any(name.startswith(p) for p in inside) and not any(
            name == r or name.startswith(r + ".") for r in reopened
        ):
            continue
        if isinstance(module, Adapter) or getattr(module, TRAINABLE_ATTR, None) is True:
            inside.append(name + ".")
            if through_wrappers and hasattr(module, "base_layer"):
                reopened.append(name + ".base_layer")
        out.append((name, module))
    return out


def _check_collisions(selected: list[tuple[str, nn.Module]], what: str) -> None:
    """Refuse to wrap a module that another tuner already wraps (stacked tuners whose targets collide)."""
    taken = [(n, m) for n, m in selected if _is_wrapper(m) and not getattr(m, "shares_placement", False)]
    if taken:
        name, module = taken[0]
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise ValueError(
            f"{what} selects {name!r}{more}, which another tuner already wraps ({type(module).__name__}): "
            "two tuners cannot adapt the same module. Give one of them target_modules/exclude_modules that "
            "leave it out."
        )


def _no_match_error(model: nn.Module, what: str, pattern: Pattern, names: list[str]) -> ValueError:
    wanted = [pattern] if isinstance(pattern, str) else list(pattern)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close: list[str] = []
    for w in wanted:
        last = w.rsplit(".", 1)[-1]
        close += difflib.get_close_matches(last, leaves, n=4, cutoff=0.5)
        close += difflib.get_close_matches(w, names, n=2, cutoff=0.6)
    close = list(dict.fromkeys(close))
    hint = f" Closest names: {', '.join(map(repr, close))}." if close else ""
    examples = ", ".join(names[:: max(1, len(names) // 8)][:8])
    return ValueError(
        f"{what}={pattern!r} matched no module of {type(model).__name__}.{hint} "
        f"Module names look like: {examples}. A list matches names or dotted suffixes; a string is a "
        "full-match regex; 'all-linear' picks every linear layer."
    )


def find_modules(
    model: nn.Module,
    pattern: Pattern,
    *,
    what: str = "target_modules",
    exclude: Pattern | None = None,
    layers: Sequence[int] | None = None,
    types: tuple[type[nn.Module], ...] | None = None,
    type_hint: str = "",
    through_wrappers: bool = False,
) -> list[str]:
    """Names of the modules of ``model`` selected by ``pattern`` (in model order).

    Args:
        model: the model to search.
        pattern: list of names/suffixes, a full-match regex, or ``"all-linear"``.
        what: the config field being resolved, for error messages.
        exclude: names/suffixes/regex removed from the matches.
        layers: keep only matches in these transformer blocks.
        types: when given, every match must be an instance of one of these (else a clear error).
        type_hint: what the tuner supports, for that error.
        through_wrappers: also search the base layers inside injected wrappers (for tuners that change a
            base layer in place instead of wrapping it, such as BitFit).

    Raises:
        ValueError: nothing matched (closest names listed), a match is already wrapped by another tuner, or
            a match has an unsupported type.
    """
    candidates = _candidates(model, through_wrappers=through_wrappers)
    names = [n for n, _ in candidates]
    if pattern == ALL_LINEAR:
        lin = linear_types()
        selected = [
            (n, m)
            for n, m in candidates
            if isinstance(_innermost(m), lin) and not (set(n.split(".")) & HEAD_NAMES)
        ]
        if not selected:
            raise ValueError(f"{what}='all-linear' found no nn.Linear/Conv1D in {type(model).__name__}")
    else:
        selected = [(n, m) for n, m in candidates if matches(n, pattern)]
        if not selected:
            raise _no_match_error(model, what, pattern, names)
        # A list entry that matched nothing is an error too: ["query", "valeu"] must not half-work.
        if not isinstance(pattern, str):
            for p in pattern:
                if not any(n == p or n.endswith("." + p) for n, _ in selected):
                    raise _no_match_error(model, what, [p], names)
    if exclude is not None:
        selected = [(n, m) for n, m in selected if not matches(n, exclude)]
    if layers is not None:
        wanted = set(layers)
        present = {block_index(n) for n, _ in selected} - {None}
        missing = sorted(wanted - present)
        if missing:
            raise ValueError(
                f"layers={list(layers)}: no {what} match in block(s) {missing}; "
                f"the matches are in blocks {sorted(present)}"
            )
        selected = [(n, m) for n, m in selected if block_index(n) in wanted]
    if not selected:
        raise ValueError(f"{what}={pattern!r}: every match was removed by exclude_modules/layers")
    if not through_wrappers:
        _check_collisions(selected, what)
    if types is not None:
        for n, m in selected:
            if not isinstance(m, types):
                raise TypeError(
                    f"{what} matched {n!r}, a {type(m).__name__}, which this tuner cannot adapt "
                    f"(supported: {type_hint or ', '.join(t.__name__ for t in types)}). Target its leaf "
                    f"layers instead, e.g. {', '.join(repr(c) for c in _leaf_examples(m, n, types))}."
                )
    return [n for n, _ in selected]


def _innermost(module: nn.Module) -> nn.Module:
    while _is_wrapper(module):
        module = module.base_layer
    return module


def _leaf_examples(module: nn.Module, name: str, types: tuple[type[nn.Module], ...]) -> list[str]:
    leaves = [f"{name}.{n}" for n, m in module.named_modules() if n and isinstance(m, types)]
    return leaves[:3] or ["<a Linear layer>"]
