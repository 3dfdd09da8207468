"""The one contract every attention variant implements, and the registry that names them.

Tensor layout (the same as :func:`torch.nn.functional.scaled_dot_product_attention`):

* ``q``: ``(B, H, Tq, D)``; ``k``, ``v``: ``(B, H, Tk, D)`` with ``Tk == num_prefix + num_cached + Tq``, in
  that order: ``num_prefix`` prefix-tuning keys (Li & Liang 2021) that every query may see and that have no
  position, then ``num_cached`` keys of earlier tokens from a KV cache (decoding), then the keys of the
  queries' own tokens. Sequence positions: key ``num_prefix + j`` is token ``j``; query ``i`` is token
  ``num_cached + i`` (the queries are the last ``Tq`` tokens of the cached + new sequence), so a cached
  decoding step returns what the full forward returns at those positions. Only variants with
  ``capabilities.kv_cache`` take ``num_cached > 0``; the others refuse it.
* ``key_padding_mask``: ``(B, Tk)`` bool, ``True`` for a real token, ``False`` for padding. This compact
  2-D mask is what the variants take; nothing here ever builds a dense ``(B, 1, Tq, Tk)`` mask for them.
* ``global_mask``: ``(B, Tq)`` bool, ``True`` for tokens that attend to and are attended from every
  position (Longformer/BigBird global tokens). Only variants with ``capabilities.global_tokens`` take it.
* Output: ``(B, H, Tq, D)``. Outputs at padded query positions are unspecified (but finite).

Token mixers (FNet, MLP-Mixer) have no q/k/v: they subclass :class:`TokenMixer` and map hidden states
``(B, T, C)`` to ``(B, T, C)``; swapping replaces a model's whole self-attention module with them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "AttentionVariant",
    "Capabilities",
    "TokenMixer",
    "available_attention",
    "build_attention",
    "get_attention",
    "register_attention",
]


@dataclass(frozen=True)
class Capabilities:
    """What a variant supports; the swap machinery and the contract tests read these flags.

    Attributes:
        causal: accepts ``causal=True`` (decoder self-attention) without leaking the future.
        padding_mask: honours ``key_padding_mask`` (padded keys get zero weight, and outputs of real
            tokens do not depend on how much padding follows).
        global_tokens: accepts ``global_mask``.
        max_length: has parameters along the sequence axis, so it needs a fixed maximum length.
        prefix_keys: accepts ``num_prefix > 0`` extra keys from prefix tuning.
        exact_limit: has a setting at which it equals dense softmax attention (window >= n, ...).
        kv_cache: accepts ``num_cached > 0`` keys from a KV cache (decoding) and then returns, for its
            ``Tq`` queries, what it returns at those positions over the whole sequence at once.
    """

    causal: bool = False
    padding_mask: bool = True
    global_tokens: bool = False
    max_length: bool = False
    prefix_keys: bool = False
    exact_limit: bool = False
    kv_cache: bool = False


_REGISTRY: dict[str, type[nn.Module]] = {}


def register_attention(name: str):
    """Class decorator that registers an attention variant or token mixer under ``name``."""

    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"attention variant {name!r} is already registered by {_REGISTRY[name]!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_attention() -> list[str]:
    """Names of every registered variant, sorted."""
    return sorted(_REGISTRY)


def get_attention(name: str) -> type[nn.Module]:
    """The class registered as ``name``; an unknown name lists the known ones and the closest."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown attention variant {name!r}.{hint} Known variants: {', '.join(available_attention())}."
        ) from None


def build_attention(
    name: str, *, num_heads: int, head_dim: int, max_length: int | None = None, **options: Any
) -> nn.Module:
    """Instantiate variant ``name`` for ``num_heads`` heads of size ``head_dim``.

    ``max_length`` is the model's maximum sequence length; variants with ``capabilities.max_length``
    size their sequence-axis parameters with it and refuse longer inputs.
    """
    return get_attention(name)(num_heads=num_heads, head_dim=head_dim, max_length=max_length, **options)


class AttentionVariant(nn.Module):
    """Base class of q/k/v attention variants: validates inputs once, then calls :meth:`attend`.

    Subclasses set ``capabilities`` and implement :meth:`attend` with the same arguments as
    :meth:`forward`; they can rely on the checks made here.
    """

    name: ClassVar[str] = "base"
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, *, num_heads: int, head_dim: int, max_length: int | None = None) -> None:
        super().__init__()
        if num_heads <= 0 or head_dim <= 0:
            raise ValueError(f"num_heads and head_dim must be positive, got {num_heads} and {head_dim}")
        if self.capabilities.max_length and max_length is None:
            raise ValueError(
                f"attention variant {self.name!r} needs max_length (it learns along the sequence)"
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.max_length = max_length

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
        num_prefix: int = 0,
        global_mask: Tensor | None = None,
        num_cached: int = 0,
    ) -> Tensor:
        self._check(q, k, v, key_padding_mask, causal, num_prefix, global_mask, num_cached)
        return self.attend(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            causal=causal,
            scale=q.shape[-1] ** -0.5 if scale is None else scale,
            num_prefix=num_prefix,
            global_mask=global_mask,
            num_cached=num_cached,
        )

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        causal: bool,
        scale: float,
        num_prefix: int,
        global_mask: Tensor | None,
        num_cached: int,
    ) -> Tensor:
        raise NotImplementedError

    def _check(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None,
        causal: bool,
        num_prefix: int,
        global_mask: Tensor | None,
        num_cached: int = 0,
    ) -> None:
        caps = self.capabilities
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(
                f"{self.name}: q, k, v must be (B, H, T, D); "
                f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if q.shape[-1] != k.shape[-1] or k.shape[:-1] != v.shape[:-1] or q.shape[:2] != k.shape[:2]:
            raise ValueError(
                f"{self.name}: mismatched shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                "q and k need the same head dim, k and v the same (B, H, Tk), all the same (B, H)"
            )
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"{self.name}: head dim {q.shape[-1]} != the {self.head_dim} it was built for")
        if num_prefix < 0 or num_cached < 0 or k.shape[2] != num_prefix + num_cached + q.shape[2]:
            raise ValueError(
                f"{self.name}: expected Tk = num_prefix + num_cached + Tq = {num_prefix} + {num_cached} + "
                f"{q.shape[2]}, got Tk = {k.shape[2]}"
            )
        if num_cached and not caps.kv_cache:
            raise ValueError(
                f"attention variant {self.name!r} cannot attend over a KV cache ({num_cached} cached keys): "
                "run the model without one (generate(..., use_cache=False), or use_cache=False in the "
                f"forward), or swap in a variant that can "
                f"({', '.join(n for n in available_attention() if _caps(n).kv_cache)})"
            )
        if causal and not caps.causal:
            raise ValueError(
                f"attention variant {self.name!r} cannot do causal attention; choose one of "
                f"{', '.join(n for n in available_attention() if _caps(n).causal)}"
            )
        if num_prefix and not caps.prefix_keys:
            raise ValueError(
                f"attention variant {self.name!r} cannot take prefix-tuning keys; use a variant that can ("
                f"{', '.join(n for n in available_attention() if _caps(n).prefix_keys)}) or another tuner"
            )
        if global_mask is not None and not caps.global_tokens:
            raise ValueError(f"attention variant {self.name!r} has no global tokens; drop global_mask")
        if key_padding_mask is not None and (
            key_padding_mask.shape != (k.shape[0], k.shape[2]) or key_padding_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"{self.name}: key_padding_mask must be bool (B, Tk) = ({k.shape[0]}, {k.shape[2]}), "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        if self.max_length is not None and caps.max_length and num_cached + q.shape[2] > self.max_length:
            raise ValueError(
                f"{self.name}: sequence length {num_cached + q.shape[2]} exceeds "
                f"max_length={self.max_length}; "
                "rebuild the variant with a larger max_length or truncate the input"
            )


class TokenMixer(nn.Module):
    """Base class of token mixers that replace a whole self-attention block (FNet, MLP-Mixer).

    ``forward(hidden (B, T, C), key_padding_mask (B, T) bool | None) -> (B, T, C)``.
    """

    name: ClassVar[str] = "token_mixer"
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, *, num_heads: int, head_dim: int, max_length: int | None = None) -> None:
        super().__init__()
        if self.capabilities.max_length and max_length is None:
            raise ValueError(f"token mixer {self.name!r} needs max_length")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.hidden_size = num_heads * head_dim
        self.max_length = max_length


def _caps(name: str) -> Capabilities:
    return getattr(_REGISTRY[name], "capabilities", Capabilities())
