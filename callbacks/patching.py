"""One way for our callbacks to hook into Lightning: wrap a method for one ``fit`` and undo it in teardown.

Lightning gives callbacks no hook right after ``configure_model`` and none around the strategy's state-dict
and checkpoint I/O, so ``PEFT`` and ``AttentionSwap`` wrap those methods on the LightningModule or the
strategy instance. A wrap made through :class:`Patches` is bound to the callback instance that made it
(its closure holds that callback), is made at most once per target per fit (``setup`` runs once per stage),
and :meth:`Patches.restore` puts the original attribute back in the callback's ``teardown``. So a module can
be fitted again with a new Trainer and new callbacks: nothing of the first run stays wrapped around it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Patches"]

_MISSING = object()


class _Entry:
    __slots__ = ("before", "name", "obj", "wrapper")

    def __init__(self, obj: Any, name: str, before: Any, wrapper: Any) -> None:
        self.obj, self.name, self.before, self.wrapper = obj, name, before, wrapper


class Patches:
    """The methods one callback wrapped for the current fit.

    Wraps of several callbacks on one attribute form a chain (each holds the one below); undoing one in any
    order unlinks it from the chain, so the others still undo cleanly.
    """

    #: every live wrap of every callback, to unlink a wrap that another one was made on top of
    _live: list[_Entry] = []  # noqa: RUF012

    def __init__(self) -> None:
        self._own: list[_Entry] = []

    def wrap(self, obj: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
        """Replace ``obj.name`` by ``make(current method)`` unless this callback did so already this fit.

        Returns:
            Whether a new wrap was made.
        """
        if self.wrapped(obj, name):
            return False
        entry = _Entry(obj, name, vars(obj).get(name, _MISSING), None)
        entry.wrapper = make(getattr(obj, name))
        object.__setattr__(obj, name, entry.wrapper)
        self._own.append(entry)
        Patches._live.append(entry)
        return True

    def wrapped(self, obj: Any, name: str) -> bool:
        """Whether this callback wrapped ``obj.name`` in the current fit."""
        return any(e.obj is obj and e.name == name for e in self._own)

    def restore(self) -> None:
        """Undo every wrap of this callback (newest first)."""
        for entry in reversed(self._own):
            above = next((e for e in Patches._live if e.obj is entry.obj and e.before is entry.wrapper), None)
            if above is not None:  # another callback wrapped on top of ours: let it skip ours on undo
                above.before = entry.before
            elif vars(entry.obj).get(entry.name, _MISSING) is entry.wrapper:
                if entry.before is _MISSING:
                    vars(entry.obj).pop(entry.name, None)
                else:
                    object.__setattr__(entry.obj, entry.name, entry.before)
            Patches._live.remove(entry)
        self._own.clear()
