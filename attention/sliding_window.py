"""Sliding-window (local) attention with dilation and global tokens, as in Longformer.

"Longformer: The Long-Document Transformer" (Beltagy, Peters & Cohan 2020). Query ``i`` attends to the keys
``j`` with ``|i - j| <= window // 2`` (``window`` is the TOTAL span, like Longformer's ``attention_window``:
the default 512 means 256 keys on each side plus the query's own position). With ``causal=True`` only the left
half and the query itself remain. With dilation ``d`` (per head) the window keys are ``i + d*m`` for
``|m| <= window // 2``. Global tokens (``global_mask``) attend to every key and every query attends to them;
prefix-tuning keys are treated as global keys (every query sees them, they are never queries).

KV cache (decoding): the ``num_cached`` keys of earlier tokens are sequence keys, not prefix keys: the
queries are tokens ``num_cached ..`` and see the cached keys inside their window only. Only the last
``max(dilation) * window // 2`` cached keys can be in a query's window; they are kept, the queries are put
after them (with placeholder queries in front, whose outputs are dropped), and the usual banded attention
runs on that short stretch: a decoding step costs O(dilation * window^2) however long the sequence is,
and returns what the full forward returns at those positions. Global tokens cannot be combined with a
cache (``global_mask`` covers the new tokens only, and a cached global token would have to have seen the
future).

Attention sinks (``sink_tokens=s``; Xiao et al. 2024, "Efficient Streaming Language Models with Attention
Sinks", StreamingLLM): the first ``s`` real tokens of each sequence stay visible to every later query, as
extra keys outside the band (never counted twice). Pretrained decoders put much of their attention mass on
the first tokens; a plain window takes those away from every query past it, which is what costs a swapped
pretrained model most of its perplexity. With a KV cache the sinks are kept with the cached keys.

Memory is O(n * window): nothing of size n x n exists, masks included. The sequence is cut into blocks
of ``window // 2`` queries; each block attends to a band of three key blocks (its own and both neighbours)
plus the global keys, in one batched call to PyTorch's fused SDPA kernel with a small per-block mask.
Dilation ``d`` is exact and free: positions with the same residue modulo ``d`` form an undilated sequence,
so they are folded into the batch. Exact limit: ``window // 2 >= T - 1`` equals dense attention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_peft.attention.base import AttentionVariant, Capabilities, register_attention

__all__ = [
    "SlidingWindowAttention",
    "banded_attention",
    "extra_keys",
    "gather_tokens",
    "global_query_rows",
    "select_tokens",
    "sink_mask",
]


def select_tokens(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the True entries of a ``(B, T)`` mask, left-aligned and padded to the batch maximum.

    Returns ``(idx, valid)``, both ``(B, G)``: ``idx`` long (0 where ``valid`` is False), ``valid`` bool.
    """
    count = int(mask.sum(1).max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :count]  # (B, G)
    valid = mask.gather(1, order)
    return order.masked_fill(~valid, 0), valid


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, h, idx[b, g], :]`` for ``x`` (B, H, T, D) and ``idx`` (B, G) -> (B, H, G, D)."""
    B, H, _, D = x.shape
    return x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], D))


def extra_keys(
    k: Tensor, v: Tensor, key_valid: Tensor, num_prefix: int, global_keys: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Keys every query may see: the prefix keys, then the sequence's global keys.

    Args:
        k, v: ``(B, H, Tk, D)`` with the ``num_prefix`` prefix keys first.
        key_valid: ``(B, Tk)`` bool, True for real keys.
        global_keys: ``(B, T)`` bool over the non-prefix keys, or None.

    Returns:
        ``(ek, ev, valid, pos)``: ``(B, H, G, D)`` keys and values, ``(B, G)`` validity, and ``(B, G)``
        position in the sequence (``-1`` for prefix keys, which causal queries always see).
    """
    B, P = k.shape[0], num_prefix
    ek, ev = k[:, :, :P], v[:, :, :P]
    valid = key_valid[:, :P]
    pos = torch.full((B, P), -1, dtype=torch.long, device=k.device)
    if global_keys is not None:
        idx, gvalid = select_tokens(global_keys & key_valid[:, P:])
        ek = torch.cat([ek, gather_tokens(k[:, :, P:], idx)], dim=2)
        ev = torch.cat([ev, gather_tokens(v[:, :, P:], idx)], dim=2)
        valid, pos = torch.cat([valid, gvalid], 1), torch.cat([pos, idx], 1)
    return ek, ev, valid, pos


def sink_mask(key_valid: Tensor, sink_tokens: int) -> Tensor:
    """``(B, T)`` bool: the first ``sink_tokens`` real (valid) keys of each row (left padding skipped)."""
    return key_valid & (key_valid.cumsum(1) <= sink_tokens)


def _blocks(x: Tensor, block: int, nb: int) -> Tensor:
    """``(B, H, T, D)`` -> ``(B, nb, H, block, D)``, zero-padding T up to ``nb * block``."""
    B, H, T, D = x.shape
    x = F.pad(x, (0, 0, 0, nb * block - T))
    return x.view(B, H, nb, block, D).transpose(1, 2)


def banded_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_valid: Tensor,
    *,
    one_sided: int,
    causal: bool,
    scale: float,
    positions: Tensor | None = None,
    extra: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """Each query ``i`` attends to keys ``|i - j| <= one_sided`` (``i - one_sided <= j <= i`` if causal).

    Args:
        q, k, v: ``(B, H, T, D)``, no prefix keys.
        key_valid: ``(B, T)`` bool; False keys are left out of the band (padding, or global keys that
            are seen through ``extra`` instead).
        positions: ``(B, T)`` original position of each query (for causal masking of extra keys);
            ``arange(T)`` by default.
        extra: ``(ek, ev, valid, pos)`` from :func:`extra_keys`, keys every query sees besides its band.

    Returns:
        ``(B, H, T, D)``; a query with no visible key gets zeros.
    """
    B, H, T, D = q.shape
    bs = max(1, min(one_sided, T))  # block size >= one_sided, so three blocks cover the window
    nb = -(-T // bs)
    qb = _blocks(q, bs, nb).reshape(B * nb, H, bs, D)  # (B*nb, H, bs, D)
    # Key band of block i: key blocks i-1, i, i+1 (one zero block of padding at each end).
    kp = F.pad(k, (0, 0, bs, bs)).contiguous()
    vp = F.pad(v, (0, 0, bs, bs)).contiguous()
    kb, vb = _blocks(kp, bs, nb + 2), _blocks(vp, bs, nb + 2)  # (B, nb+2, H, bs, D)
    kv_valid = F.pad(key_valid, (bs, nb * bs - T + bs), value=False).view(B, nb + 2, bs)
    valid_band = torch.cat([kv_valid[:, :nb], kv_valid[:, 1 : nb + 1], kv_valid[:, 2:]], 2)  # (B, nb, 3bs)
    rel = torch.arange(3 * bs, device=q.device)[None, :] - bs - torch.arange(bs, device=q.device)[:, None]
    in_window = (rel >= -one_sided) & (rel <= (0 if causal else one_sided))  # (bs, 3bs), key - query offset
    mask = in_window[None, None] & valid_band[:, :, None, :]  # (B, nb, bs, 3bs)
    k_parts = [kb[:, :nb], kb[:, 1 : nb + 1], kb[:, 2:]]
    v_parts = [vb[:, :nb], vb[:, 1 : nb + 1], vb[:, 2:]]
    if extra is not None and extra[0].shape[2] > 0:
        ek, ev, evalid, epos = extra
        G = ek.shape[2]
        k_parts.insert(0, ek[:, None].expand(B, nb, H, G, D))
        v_parts.insert(0, ev[:, None].expand(B, nb, H, G, D))
        emask = evalid[:, None, None, :].expand(B, nb, bs, G)  # (B, nb, bs, G)
        if causal:
            if positions is None:
                positions = torch.arange(T, device=q.device).expand(B, T)
            qpos = F.pad(positions, (0, nb * bs - T), value=-2).view(B, nb, bs)
            emask = emask & (epos[:, None, None, :] <= qpos[..., None])
        mask = torch.cat([emask, mask], dim=3)
    kband = torch.cat(k_parts, dim=3).reshape(B * nb, H, -1, D)  # (B*nb, H, G+3bs, D)
    vband = torch.cat(v_parts, dim=3).reshape(B * nb, H, -1, D)
    out = F.scaled_dot_product_attention(
        qb, kband, vband, attn_mask=mask.reshape(B * nb, 1, bs, -1), scale=scale
    )
    any_key = mask.any(-1).reshape(B * nb, 1, bs, 1)
    out = out * any_key  # rows with no visible key are zero whatever the kernel does with them
    return out.view(B, nb, H, bs, D).transpose(1, 2).reshape(B, H, nb * bs, D)[:, :, :T]  # (B, H, T, D)


def global_query_rows(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    query_idx: Tensor,
    query_valid: Tensor,
    key_valid: Tensor,
    *,
    causal: bool,
    scale: float,
    num_prefix: int,
) -> Tensor:
    """Replace the rows ``query_idx`` (B, G) of ``out`` (B, H, T, D) by full attention over every key."""
    B, H, T, D = out.shape
    qg = gather_tokens(q, query_idx)  # (B, H, G, D)
    mask = key_valid[:, None, None, :]  # (B, 1, 1, Tk)
    if causal:
        kpos = torch.arange(k.shape[2], device=q.device) - num_prefix  # (Tk,), prefix keys < 0
        mask = mask & (kpos[None, None, None, :] <= query_idx[:, None, :, None])  # (B, 1, G, Tk)
    og = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)  # (B, H, G, D)
    target = query_idx.masked_fill(~query_valid, T)  # invalid slots write into a scratch row T
    out = torch.cat([out, out.new_zeros(B, H, 1, D)], dim=2)
    out = out.scatter(2, target[:, None, :, None].expand(B, H, target.shape[1], D), og)
    return out[:, :, :T]


def _fold(x: Tensor, d: int, fill: float = 0) -> Tensor:
    """``(B, ..., T)`` -> ``(B*d, ..., ceil(T/d))``: the residue classes mod ``d`` go into the batch."""
    T = x.shape[-1]
    tf = -(-T // d)
    x = F.pad(x, (0, tf * d - T), value=fill)
    x = x.unflatten(-1, (tf, d)).movedim(-1, 1)  # (B, d, ..., tf)
    return x.flatten(0, 1)


@register_attention("sliding_window")
class SlidingWindowAttention(AttentionVariant):
    """Longformer sliding-window attention with optional per-head dilation and global tokens.

    Args:
        window: total window span, even; each query sees ``window // 2`` keys on each side (default 512).
        dilation: one int for all heads or one per head (default 1: no dilation).
        sink_tokens: the first ``sink_tokens`` real tokens stay visible to every query (StreamingLLM's
            attention sinks; 4 in the paper; default 0: none).

    Example::

        attn = build_attention("sliding_window", num_heads=12, head_dim=64, window=512)
        out = attn(q, k, v, key_padding_mask=mask, global_mask=cls_is_global)  # (B, H, T, D)
    """

    capabilities = Capabilities(
        causal=True, padding_mask=True, global_tokens=True, prefix_keys=True, exact_limit=True, kv_cache=True
    )

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        max_length: int | None = None,
        window: int = 512,
        dilation: int | Sequence[int] | None = None,
        sink_tokens: int = 0,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, max_length=max_length)
        if window < 2 or window % 2:
            raise ValueError(
                f"window must be a positive even total span (like attention_window), got {window}"
            )
        dil = [1] * num_heads if dilation is None else dilation
        dil = [dil] * num_heads if isinstance(dil, int) else list(dil)
        if len(dil) != num_heads or any(d < 1 for d in dil):
            raise ValueError(f"dilation must be a positive int or {num_heads} positive ints, got {dilation}")
        if not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"sink_tokens must be an int >= 0, got {sink_tokens!r}")
        self.window = window
        self.dilation = dil
        self.sink_tokens = sink_tokens

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, window={self.window}, " + (
            f"dilation={self.dilation}" + (f", sink_tokens={self.sink_tokens}" if self.sink_tokens else "")
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
        B, _, T, _ = q.shape
        P = num_prefix
        key_valid = (
            torch.ones(B, k.shape[2], dtype=torch.bool, device=q.device)
            if key_padding_mask is None
            else key_padding_mask
        )
        sinks = sink_mask(key_valid[:, P:], self.sink_tokens) if self.sink_tokens else None
        if num_cached:
            if global_mask is not None:
                raise ValueError(
                    "sliding_window: global tokens (global_mask) cannot be combined with a KV cache; run the "
                    "whole sequence at once (use_cache=False) or drop global_mask"
                )
            return self._with_cache(q, k, v, key_valid, causal, scale, P, num_cached, sinks)
        if global_mask is not None:
            if global_mask.shape != (B, T) or global_mask.dtype != torch.bool:
                raise ValueError(
                    f"global_mask must be bool (B, T) = ({B}, {T}), got {tuple(global_mask.shape)}"
                )
            global_mask = global_mask & key_valid[:, P:]
        return self._attend(q, k, v, key_valid, causal, scale, P, global_mask, sinks)

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_valid: Tensor,
        causal: bool,
        scale: float,
        num_prefix: int,
        global_mask: Tensor | None,
        sinks: Tensor | None,
    ) -> Tensor:
        """No cache: the band, plus the extra keys every query sees (prefix keys, global tokens and
        sinks, ``(B, T)`` masks over the non-prefix keys), plus full rows for global queries."""
        H, P = q.shape[1], num_prefix
        seen = global_mask if sinks is None else sinks if global_mask is None else global_mask | sinks
        extra = extra_keys(k, v, key_valid, P, seen)
        band_valid = key_valid[:, P:] if seen is None else key_valid[:, P:] & ~seen
        kk, vv = k[:, :, P:], v[:, :, P:]
        outs, order = [], []
        for d in sorted(set(self.dilation)):  # one pass per distinct dilation, over the heads that use it
            heads = [h for h in range(H) if self.dilation[h] == d]
            order += heads
            qs, ks, vs, ek, ev = (x if len(heads) == H else x[:, heads] for x in (q, kk, vv, *extra[:2]))
            ex = (ek, ev, extra[2], extra[3])
            outs.append(self._dilated(qs, ks, vs, band_valid, d, causal, scale, ex))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)[:, torch.tensor(order).argsort()]
        if global_mask is not None and bool(global_mask.any()):
            gidx, gvalid = select_tokens(global_mask)
            out = global_query_rows(
                q, k, v, out, gidx, gvalid, key_valid, causal=causal, scale=scale, num_prefix=P
            )
        return out  # (B, H, T, D)

    def _with_cache(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_valid: Tensor,
        causal: bool,
        scale: float,
        num_prefix: int,
        num_cached: int,
        sinks: Tensor | None,
    ) -> Tensor:
        """Queries at tokens ``num_cached ..``: attend on the stretch of keys their windows can reach.

        The cached keys farther back than one window (times the largest dilation) are dropped; placeholder
        queries stand in for the kept cached tokens, so the stretch is an ordinary sequence whose last ``Tq``
        tokens are the queries. Relative offsets, and hence windows and dilation classes, are unchanged.
        Sinks among the dropped keys join the prefix keys (earlier than every query: always visible); sinks
        in the stretch stay sinks there.
        """
        B, H, _, D = q.shape
        P = num_prefix
        keep = min(num_cached, max(self.dilation) * (self.window // 2))  # cached keys a window can reach
        first = P + num_cached - keep  # index of the first kept cached key
        parts_k, parts_v, parts_valid = [k[:, :, :P]], [v[:, :, :P]], [key_valid[:, :P]]
        if sinks is not None:
            idx, svalid = select_tokens(sinks[:, : first - P])  # (B, S) sinks among the dropped keys
            parts_k.append(gather_tokens(k[:, :, P:], idx))
            parts_v.append(gather_tokens(v[:, :, P:], idx))
            parts_valid.append(svalid)
            sinks = sinks[:, first - P :]  # (B, keep + T): sinks in the stretch
        ks = torch.cat([*parts_k, k[:, :, first:]], dim=2)  # (B, H, P' + keep + T, D)
        vs = torch.cat([*parts_v, v[:, :, first:]], dim=2)
        valid = torch.cat([*parts_valid, key_valid[:, first:]], dim=1)  # (B, P' + keep + T)
        qs = torch.cat([q.new_zeros(B, H, keep, D), q], dim=2)  # (B, H, keep + T, D): placeholders first
        num_extra = ks.shape[2] - keep - q.shape[2]  # the prefix keys and the dropped sinks
        out = self._attend(qs, ks, vs, valid, causal, scale, num_extra, None, sinks)
        return out[:, :, keep:]  # (B, H, T, D)

    def _dilated(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_valid: Tensor,
        d: int,
        causal: bool,
        scale: float,
        extra: tuple[Tensor, Tensor, Tensor, Tensor],
    ) -> Tensor:
        one_sided = self.window // 2
        if d == 1:
            return banded_attention(
                q, k, v, key_valid, one_sided=one_sided, causal=causal, scale=scale, extra=extra
            )
        B, H, T, D = q.shape
        # Residue class r holds positions r, r+d, ...: an undilated sequence folded into the batch.
        qf, kf, vf = (_fold(x.transpose(-1, -2), d).transpose(-1, -2) for x in (q, k, v))  # (B*d, H, T/d, D)
        positions = _fold(torch.arange(T, device=q.device).expand(B, T), d, fill=T)  # (B*d, T/d)
        valid = _fold(key_valid, d, fill=False)
        ek, ev, evalid, epos = (x.repeat_interleave(d, dim=0) for x in extra)
        out = banded_attention(
            qf,
            kf,
            vf,
            valid,
            one_sided=one_sided,
            causal=causal,
            scale=scale,
            positions=positions,
            extra=(ek, ev, evalid, epos),
        )  # (B*d, H, T/d, D)
        out = out.unflatten(0, (B, d)).permute(0, 2, 3, 1, 4).reshape(B, H, -1, D)  # (B, H, T/d*d, D)
        return out[:, :, :T]
