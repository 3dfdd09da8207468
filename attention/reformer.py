"""LSH attention from Reformer (Kitaev, Kaiser & Levskaya, "Reformer: The Efficient Transformer", ICLR 2020).

Each query attends only to keys that fall into the same hash bucket, found by sorting:

1. **Shared QK.** Keys are the unit-normalised queries, ``k_j = q_j / ||q_j||``, so a query and the keys
   it should see hash alike. The ``k`` argument is therefore only checked for shape and otherwise ignored;
   when :func:`~lightning_peft.attention.swap.swap_attention` puts this variant into a pretrained model the
   model's ``key`` projection still runs but its output is unused (keys come from ``q``).
2. **Angular LSH.** ``h(x) = argmax([xR; -xR])`` for a random rotation ``R`` of shape ``(D, n_buckets/2)``,
   drawn independently for each of ``n_hashes`` rounds and each head. In training the rotations are drawn
   afresh every call (as in the paper); in eval they are a fixed buffer drawn once from ``seed``, so
   evaluation is deterministic and reproducible.
3. **Sort and chunk.** Tokens are sorted by ``(bucket, position)`` and cut into chunks of ``bucket_size``;
   every chunk attends to itself and to the previous chunk.
4. **No attention to self** unless nothing else is visible: the self logit gets a large finite negative
   value (the paper uses -1e5), so it only wins when every other key is masked.
5. **Causal** (``causal=True``): a query sees the last ``bucket_size`` keys *of its own bucket* before it,
   plus itself. The paper's "this chunk and the previous one" would let later tokens move the chunk
   boundaries and so change earlier outputs; the per-bucket look-back does not.
6. **Rounds are combined** by their softmax normalisers, ``o = sum_r exp(lse_r - logsumexp_r lse_r) o_r``.

Padding and exactness. Padded tokens hash into a bucket of their own that sorts after every real bucket,
and padded keys are also masked outright, so they are never attended. The number of buckets is fixed at
construction (from ``max_length``) rather than derived from the padded length, and the first chunk does
not wrap around to the last (the paper's look-back is circular), so the real tokens' sorted order, their
chunks, and therefore their outputs do not depend on how much padding follows. At ``bucket_size >= T``
there is a single chunk and the result is exact softmax attention over the shared-QK keys, without self;
with ``n_buckets=1`` (no hashing) the same holds for causal attention.

KV cache: refused (``capabilities.kv_cache`` is False). The keys are the earlier tokens' normalised queries,
which a KV cache does not keep, and the hashing sorts the whole sequence at once; decode with
``use_cache=False``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_peft.attention.base import AttentionVariant, Capabilities, register_attention

__all__ = ["ReformerAttention"]

_MASKED = -1e9  # logit of a padded / future key (finite: a fully masked padded query stays finite)
_SELF = -1e5  # logit of the query's own key (the paper's value): used only when nothing else is visible


@register_attention("reformer")
class ReformerAttention(AttentionVariant):
    """Multi-round LSH attention with shared query/key.

    Args:
        num_heads: attention heads ``H``.
        head_dim: size of one head ``D``.
        max_length: the model's maximum length; sets the default number of buckets.
        bucket_size: chunk length (and average bucket size); each query sees at most ``2 * bucket_size`` keys.
        n_hashes: hashing rounds; more rounds lower the chance that similar items land in different buckets.
        n_buckets: buckets per round: even, or 1 for no hashing. Default:
            ``2 * ceil(max_length / (2 * bucket_size))``, or 8 when ``max_length`` is unknown.
        seed: seed of the fixed eval-time rotations.
    """

    capabilities = Capabilities(causal=True, padding_mask=True)

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        max_length: int | None = None,
        bucket_size: int = 32,
        n_hashes: int = 2,
        n_buckets: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, max_length=max_length)
        if bucket_size <= 0 or n_hashes <= 0:
            raise ValueError(f"bucket_size and n_hashes must be positive, got {bucket_size} and {n_hashes}")
        if n_buckets is None:
            n_buckets = 2 * math.ceil(max_length / (2 * bucket_size)) if max_length else 8
        if n_buckets < 1 or (n_buckets > 1 and n_buckets % 2):
            raise ValueError(f"n_buckets must be 1 (no hashing) or an even number >= 2, got {n_buckets}")
        self.bucket_size = bucket_size
        self.n_hashes = n_hashes
        self.n_buckets = n_buckets
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        # (H, R, D, n_buckets / 2): one random rotation per head and hashing round, fixed for eval.
        rotations = torch.randn(num_heads, n_hashes, head_dim, max(n_buckets // 2, 1), generator=generator)
        self.register_buffer("eval_rotations", rotations, persistent=False)

    def extra_repr(self) -> str:
        return f"bucket_size={self.bucket_size}, n_hashes={self.n_hashes}, n_buckets={self.n_buckets}"

    def _rotations(self, like: Tensor) -> Tensor:
        if self.training:
            return torch.randn(self.eval_rotations.shape, device=like.device, dtype=torch.float32)
        return self.eval_rotations.to(device=like.device, dtype=torch.float32)

    def _hash(self, q: Tensor, real: Tensor) -> Tensor:
        """Bucket ids ``(B, H, R, T)``; padded tokens get the extra bucket ``n_buckets``."""
        if self.n_buckets == 1:
            buckets = q.new_zeros(q.shape[0], q.shape[1], self.n_hashes, q.shape[2], dtype=torch.long)
        else:
            rotated = torch.einsum("bhtd,hrdk->bhrtk", q.float(), self._rotations(q))  # (B, H, R, T, nb/2)
            buckets = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)  # (B, H, R, T)
        return torch.where(real[:, None, None, :], buckets, self.n_buckets)

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
        B, H, T, D = q.shape
        R, c = self.n_hashes, self.bucket_size
        real = key_padding_mask
        if real is None:
            real = torch.ones(B, T, dtype=torch.bool, device=q.device)
        keys = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # shared QK: (B, H, T, D)

        # Sort every round by (bucket, position); pad the sorted axis to whole chunks with dummy slots.
        n_chunks = math.ceil(T / c)
        Tp = n_chunks * c
        positions = torch.arange(T, device=q.device)
        sort_key, order = (self._hash(q, real) * T + positions).sort(dim=-1)  # (B, H, R, T) each
        order = torch.cat([order, order.new_full((B, H, R, Tp - T), T)], dim=-1)  # (B, H, R, Tp); T = dummy
        bucket = torch.cat([sort_key // T, sort_key.new_full((B, H, R, Tp - T), -1)], dim=-1)

        def gather(x: Tensor) -> Tensor:  # (B, H, T, D) -> (B, H, R, n_chunks, c, D), sorted and chunked
            padded = torch.cat([x, x.new_zeros(B, H, 1, x.shape[-1])], dim=2)  # dummy slot at index T
            index = order.reshape(B, H, R * Tp, 1).expand(-1, -1, -1, x.shape[-1])
            return padded.gather(2, index).reshape(B, H, R, n_chunks, c, x.shape[-1])

        sq, sk, sv = gather(q), gather(keys), gather(v)
        spos = order.reshape(B, H, R, n_chunks, c)  # original position of every sorted slot
        sbucket = bucket.reshape(B, H, R, n_chunks, c)
        sslot = torch.arange(Tp, device=q.device).reshape(n_chunks, c).expand(B, H, R, -1, -1)
        sreal = torch.cat([real, real.new_zeros(B, 1)], dim=1)[:, None, None, :].expand(B, H, R, T + 1)
        sreal = sreal.gather(3, order).reshape(B, H, R, n_chunks, c)

        # Keys of a chunk: itself, then the previous chunk (none for the first chunk: no wrap-around).
        kk, kv, kpos, kreal, kbucket, kslot = (
            self._with_previous(x) for x in (sk, sv, spos, sreal, sbucket, sslot)
        )

        logits = torch.einsum("bhrncd,bhrnkd->bhrnck", sq.float(), kk.float()) * scale  # (B, H, R, nc, c, 2c)
        visible = kreal[..., None, :].expand_as(logits)
        if causal:
            # The last ``c`` same-bucket predecessors: unlike "this chunk and the previous one", that set
            # does not depend on later tokens (whose buckets shift where the chunk boundaries fall).
            visible = (
                visible
                & (kpos[..., None, :] <= spos[..., :, None])
                & (kbucket[..., None, :] == sbucket[..., :, None])
                & (kslot[..., None, :] >= sslot[..., :, None] - c)
            )
        logits = logits.masked_fill(~visible, _MASKED)
        logits = logits.masked_fill(kpos[..., None, :] == spos[..., :, None], _SELF)
        lse = logits.logsumexp(dim=-1, keepdim=True)  # (B, H, R, nc, c, 1)
        out = torch.einsum("bhrnck,bhrnkd->bhrncd", (logits - lse).exp(), kv.float())

        # Undo the sort (dummy slots dropped), then weigh the rounds by their normalisers.
        out = out.reshape(B, H, R, Tp, D)
        lse = lse.reshape(B, H, R, Tp)
        unsort = order[..., :T].argsort(dim=-1)  # (B, H, R, T); real slots sort before the dummies
        out = out.gather(3, unsort[..., None].expand(-1, -1, -1, -1, D))  # (B, H, R, T, D)
        lse = lse.gather(3, unsort)  # (B, H, R, T)
        weights = torch.softmax(lse, dim=2)[..., None]  # (B, H, R, T, 1)
        return (weights * out).sum(dim=2).to(v.dtype)  # (B, H, T, D)

    @staticmethod
    def _with_previous(x: Tensor) -> Tensor:
        """``(B, H, R, nc, c, ...)`` -> ``(B, H, R, nc, 2c, ...)``: each chunk followed by its predecessor.

        The first chunk has no predecessor: its look-back slots are filled with zeros / ``False`` (not real) /
        position ``-1``, so they are masked and nothing is counted twice when there is a single chunk.
        """
        previous = torch.roll(x, shifts=1, dims=3).clone()
        fill: Any = False if x.dtype == torch.bool else (-1 if x.dtype == torch.long else 0)
        previous[:, :, :, 0] = fill
        return torch.cat([x, previous], dim=4)
