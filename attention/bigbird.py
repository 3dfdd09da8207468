"""BigBird block-sparse attention: window blocks + global blocks/tokens + random blocks.

"Big Bird: Transformers for Longer Sequences" (Zaheer et al. 2020), the ITC form. The sequence is cut into
blocks of ``block_size`` tokens. Query block ``i`` attends to

* the ``num_window_blocks`` blocks centred on it (3 by default: ``i-1, i, i+1``),
* ``num_random_blocks`` other blocks drawn at random (never a window or global block),
* every global token; global tokens are the tokens of ``global_blocks`` (first and last block by default)
  plus any ``global_mask`` tokens, and they attend to every key themselves,
* prefix-tuning keys, treated as global keys.

Random blocks are drawn from a seeded :class:`torch.Generator`. In training each forward draws a fresh pattern
from the module's generator (reproducible given ``seed``); in eval the pattern is a fixed function of ``seed``
and the number of blocks, so eval is deterministic and still sparse: there is no silent switch to full
attention in eval, and a short input (fewer blocks than the pattern needs) simply has fewer random candidates,
without changing any mode for later inputs (the pitfall of transformers #20031).

``global_blocks="all"`` makes every token global, which is dense attention (the exact limit). Memory is
O(n * block_size * blocks_per_query); all keys a query block sees are gathered in one indexing operation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_peft.attention.base import AttentionVariant, Capabilities, register_attention
from lightning_peft.attention.sliding_window import global_query_rows, select_tokens

__all__ = ["BigBirdAttention"]


@register_attention("bigbird")
class BigBirdAttention(AttentionVariant):
    """Block-sparse BigBird attention (bidirectional).

    Args:
        block_size: tokens per block (64).
        num_window_blocks: odd number of neighbouring blocks each query block sees, itself included (3).
        num_random_blocks: random blocks per query block (3).
        global_blocks: indices of global blocks (negative counts from the end), or ``"all"`` for dense.
        seed: seed of the random-block generator.

    Example::

        attn = build_attention("bigbird", num_heads=12, head_dim=64, block_size=64, num_random_blocks=3)
        out = attn(q, k, v, key_padding_mask=mask)  # (B, H, T, D)
    """

    capabilities = Capabilities(
        causal=False, padding_mask=True, global_tokens=True, prefix_keys=True, exact_limit=True
    )

    def __init__(
        self,
        *,
        num_heads: int,
        head_dim: int,
        max_length: int | None = None,
        block_size: int = 64,
        num_window_blocks: int = 3,
        num_random_blocks: int = 3,
        global_blocks: Sequence[int] | Literal["all"] = (0, -1),
        seed: int = 0,
    ) -> None:
        super().__init__(num_heads=num_heads, head_dim=head_dim, max_length=max_length)
        if block_size < 1 or num_random_blocks < 0 or num_window_blocks < 1 or num_window_blocks % 2 == 0:
            raise ValueError(
                "bigbird needs block_size >= 1, num_random_blocks >= 0 and an odd num_window_blocks >= 1; "
                f"got {block_size}, {num_random_blocks}, {num_window_blocks}"
            )
        if global_blocks != "all" and isinstance(global_blocks, str):
            raise ValueError(f"global_blocks must be block indices or 'all', got {global_blocks!r}")
        self.block_size = block_size
        self.num_window_blocks = num_window_blocks
        self.num_random_blocks = num_random_blocks
        self.global_blocks = global_blocks if global_blocks == "all" else tuple(global_blocks)
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, num_window_blocks={self.num_window_blocks}, "
            f"num_random_blocks={self.num_random_blocks}, global_blocks={self.global_blocks}, "
            f"seed={self.seed}"
        )

    def global_block_ids(self, real_blocks: Tensor, nb: int) -> Tensor:
        """``(B, nb)`` bool: the global blocks of each sequence, counted within its REAL blocks.

        ``-1`` is the last block holding a real token, so trailing padding never moves a global block.
        """
        ids = torch.arange(nb, device=real_blocks.device)[None, :]  # (1, nb)
        if self.global_blocks == "all":
            return ids < real_blocks[:, None]
        out = torch.zeros(real_blocks.shape[0], nb, dtype=torch.bool, device=real_blocks.device)
        for g in self.global_blocks:
            target = g + real_blocks if g < 0 else torch.full_like(real_blocks, g)  # (B,)
            ok = (target >= 0) & (target < real_blocks)
            out |= (ids == target[:, None]) & ok[:, None]
        return out

    def _scores(self, rows: int, cols: int, seed: int) -> Tensor:
        """``(rows, cols)`` uniform scores, tile by tile from ``Generator(seed, tile)``: entry (i, j) never
        depends on ``rows``/``cols``, so a longer (padded) input keeps every earlier random choice."""
        tile = 32
        nr, nc = -(-rows // tile), -(-cols // tile)
        grid = [
            [
                torch.rand(tile, tile, generator=torch.Generator().manual_seed(seed * 7919 + i * 104729 + j))
                for j in range(nc)
            ]
            for i in range(nr)
        ]
        return torch.cat([torch.cat(r, 1) for r in grid], 0)[:rows, :cols]

    def block_pattern(
        self, real_blocks: Tensor, nb: int, seed: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Key blocks of each query block of each sequence.

        Args:
            real_blocks: ``(B,)`` number of blocks that hold real tokens, per sequence.
            nb: number of blocks of the (padded) input.
            seed: seed of the random scores; ``self.seed`` (the fixed eval pattern) by default.

        Returns:
            ``(idx, valid, global_blocks)``: ``(B, nb, num_window_blocks + r)`` block indices and their
            validity, and the ``(B, nb)`` global blocks. A random block is never a window or global
            block, and is drawn among the sequence's real blocks only.
        """
        dev = real_blocks.device
        half = self.num_window_blocks // 2
        rows = torch.arange(nb, device=dev)[:, None]
        window = rows + torch.arange(-half, half + 1, device=dev)[None, :]  # (nb, w)
        window_valid = (window >= 0) & (window < nb)
        glob = self.global_block_ids(real_blocks, nb)  # (B, nb)
        r = min(self.num_random_blocks, nb)
        scores = self._scores(nb, nb, self.seed if seed is None else seed).to(dev)[None]  # (1, nb, nb)
        taken = ((rows - rows.T).abs() <= half)[None] | glob[:, None, :]  # window and global blocks
        taken = taken | (real_blocks[:, None, None] <= rows.T)  # (B, nb, nb): padding-only blocks
        scores = scores.masked_fill(taken, float("inf"))
        rand = scores.argsort(dim=2)[:, :, :r]  # (B, nb, r): the r lowest scores among the free blocks
        rand_valid = scores.gather(2, rand) < float("inf")
        B = real_blocks.shape[0]
        idx = torch.cat([window.clamp(0, nb - 1).expand(B, nb, -1), rand], 2)
        return idx, torch.cat([window_valid.expand(B, nb, -1), rand_valid], 2), glob

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
        B, T = q.shape[0], q.shape[2]
        P, bs = num_prefix, self.block_size
        nb = -(-T // bs)
        key_valid = (
            torch.ones(B, k.shape[2], dtype=torch.bool, device=q.device)
            if key_padding_mask is None
            else key_padding_mask
        )
        real = key_valid[:, P:]  # (B, T)
        last = torch.where(real, torch.arange(1, T + 1, device=q.device), 0).amax(1)  # (B,) 1 + last real
        real_blocks = -(-last // bs)
        seed = self.seed
        if self.training:  # a fresh, reproducible pattern per training forward
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self._generator))
        pattern, pattern_valid, glob = self.block_pattern(real_blocks, nb, seed)
        is_global = glob[:, :, None].expand(B, nb, bs).reshape(B, nb * bs)[:, :T]  # (B, T)
        if global_mask is not None:
            if global_mask.shape != (B, T) or global_mask.dtype != torch.bool:
                raise ValueError(
                    f"global_mask must be bool (B, T) = ({B}, {T}), got {tuple(global_mask.shape)}"
                )
            is_global = is_global | global_mask
        is_global = is_global & real
        out = self._sparse(q, k, v, key_valid, is_global, pattern, pattern_valid, P, scale)
        if bool(is_global.any()):
            gidx, gvalid = select_tokens(is_global)
            out = global_query_rows(
                q, k, v, out, gidx, gvalid, key_valid, causal=False, scale=scale, num_prefix=P
            )
        return out  # (B, H, T, D)

    def _sparse(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_valid: Tensor,
        is_global: Tensor,
        pattern: Tensor,
        pattern_valid: Tensor,
        num_prefix: int,
        scale: float,
    ) -> Tensor:
        """Every query block against its pattern blocks plus the global/prefix keys, one fused SDPA call."""
        B, H, T, D = q.shape
        P, bs, nb = num_prefix, self.block_size, pattern.shape[1]
        # Key sequence laid out as blocks: [nb sequence blocks | one empty block | global & prefix keys].
        gidx, gvalid = select_tokens(is_global)  # (B, G)
        gidx = torch.cat([torch.arange(P, device=q.device).expand(B, P), gidx + P], 1)  # into k's axis
        gvalid = torch.cat([key_valid[:, :P], gvalid], 1)
        gb = -(-gidx.shape[1] // bs)  # blocks holding the global keys
        pad_g = gb * bs - gidx.shape[1]
        gidx, gvalid = F.pad(gidx, (0, pad_g)), F.pad(gvalid, (0, pad_g), value=False)

        def blocks(x: Tensor) -> Tensor:  # (B, H, Tk, D) -> (B, H, nb + 1 + gb, bs, D)
            seq = F.pad(x[:, :, P:], (0, 0, 0, (nb + 1) * bs - T))
            glob = x.gather(2, gidx[:, None, :, None].expand(B, H, gidx.shape[1], D))
            return torch.cat([seq, glob], 2).view(B, H, nb + 1 + gb, bs, D)

        band_valid = key_valid[:, P:] & ~is_global  # global keys come through the global blocks only
        valid = torch.cat([F.pad(band_valid, (0, (nb + 1) * bs - T), value=False), gvalid], 1)
        valid = valid.view(B, nb + 1 + gb, bs)
        glob_blocks = torch.arange(nb + 1, nb + 1 + gb, device=q.device).expand(B, nb, gb)
        idx = torch.cat([glob_blocks, pattern.masked_fill(~pattern_valid, nb)], 2)  # (B, nb, K); nb: empty
        K = idx.shape[2]
        flat = idx.reshape(B, 1, nb * K, 1)

        def pick(x: Tensor) -> Tensor:  # the K key blocks of every query block, per sequence
            xb = blocks(x).reshape(B, H, nb + 1 + gb, bs * D)
            return xb.gather(2, flat.expand(B, H, nb * K, bs * D)).view(B * H * nb, 1, K * bs, D)

        mask = valid.gather(1, flat.view(B, nb * K, 1).expand(B, nb * K, bs))  # (B, nb*K, bs)
        mask = mask.view(B, 1, nb, 1, K * bs).expand(B, H, nb, 1, K * bs).reshape(B * H * nb, 1, 1, K * bs)
        qb = F.pad(q, (0, 0, 0, nb * bs - T)).view(B * H * nb, 1, bs, D)
        out = F.scaled_dot_product_attention(qb, pick(k), pick(v), attn_mask=mask, scale=scale)
        out = out * mask.any(-1, keepdim=True)  # a block with no visible key outputs zeros
        return out.view(B, H, nb * bs, D)[:, :, :T]  # (B, H, T, D)
