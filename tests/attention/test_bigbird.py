"""BigBird: dense limit, the exact block pattern, random blocks kept in eval, short inputs change no mode."""

from __future__ import annotations

import pytest
import torch

from lightning_peft.attention import build_attention
from lightning_peft.attention.sdpa import dense_reference


def bigbird(**options):
    return build_attention("bigbird", num_heads=3, head_dim=8, **options).eval()


def pattern_oracle(attn, q, k, v, kpm, num_prefix, global_mask=None):
    """Dense attention under the explicit token mask implied by ``attn.block_pattern`` (eval pattern)."""
    B, _, T, D = q.shape
    bs = attn.block_size
    nb = -(-T // bs)
    real = kpm[:, num_prefix:]
    real_blocks = torch.tensor([-(-(int(torch.nonzero(r).max()) + 1) // bs) for r in real])
    idx, valid, glob_blocks = attn.block_pattern(real_blocks, nb)
    blocks = torch.zeros(B, nb, nb, dtype=torch.bool)
    for b in range(B):
        for i in range(nb):
            blocks[b, i, idx[b, i][valid[b, i]]] = True
    of = torch.arange(T) // bs
    allowed = blocks[:, of][:, :, of]  # (B, T, T)
    glob = glob_blocks[:, of]  # (B, T)
    if global_mask is not None:
        glob |= global_mask
    allowed |= glob[:, None, :] | glob[:, :, None]
    allowed = torch.cat([torch.ones(B, T, num_prefix, dtype=torch.bool), allowed], 2) & kpm[:, None]
    scores = q @ k.transpose(-1, -2) / D**0.5
    return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("num_prefix", [0, 2])
def test_all_blocks_global_equals_dense(num_prefix: int, qkv_factory) -> None:
    q, k, v = qkv_factory(2, 3, 45, 8, num_prefix=num_prefix, dtype=torch.float64)
    kpm = torch.ones(2, 45 + num_prefix, dtype=torch.bool)
    kpm[1, -6:] = False
    out = bigbird(block_size=4, global_blocks="all")(q, k, v, key_padding_mask=kpm, num_prefix=num_prefix)
    ref = dense_reference(q, k, v, key_padding_mask=kpm, num_prefix=num_prefix)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1, :, :-6], ref[1, :, :-6])


@pytest.mark.parametrize("num_prefix", [0, 2])
@pytest.mark.parametrize("block_size", [4, 5])
def test_matches_the_explicit_block_pattern(num_prefix: int, block_size: int, qkv_factory) -> None:
    T = 61
    q, k, v = qkv_factory(2, 3, T, 8, num_prefix=num_prefix, dtype=torch.float64)
    kpm = torch.ones(2, T + num_prefix, dtype=torch.bool)
    kpm[1, -7:] = False
    gm = torch.zeros(2, T, dtype=torch.bool)
    gm[0, 30] = True
    attn = bigbird(block_size=block_size, num_random_blocks=2)
    for g in (None, gm):
        out = attn(q, k, v, key_padding_mask=kpm, num_prefix=num_prefix, global_mask=g)
        ref = pattern_oracle(attn, q, k, v, kpm, num_prefix, g)
        torch.testing.assert_close(out[0], ref[0])
        torch.testing.assert_close(out[1, :, :-7], ref[1, :, :-7])


def test_pattern_has_window_and_distinct_random_blocks() -> None:
    attn = bigbird(block_size=4, num_random_blocks=3)
    idx, valid, glob = attn.block_pattern(torch.tensor([20, 14]), 20)
    assert glob[0].nonzero().flatten().tolist() == [0, 19]
    assert glob[1].nonzero().flatten().tolist() == [0, 13], "-1 must be the last REAL block"
    for b, real_blocks in enumerate((20, 14)):
        for i in range(real_blocks):
            chosen = idx[b, i][valid[b, i]].tolist()
            assert len(chosen) == len(set(chosen)), "a block is attended twice"
            assert {max(i - 1, 0), i, min(i + 1, 19)} <= set(chosen)
            rand = idx[b, i, 3:][valid[b, i, 3:]].tolist()
            assert len(rand) == 3 and all(abs(r - i) > 1 and 0 < r < real_blocks - 1 for r in rand)


def test_trailing_padding_keeps_the_sparse_pattern(qkv_factory) -> None:
    """Padding that adds whole blocks changes neither the random blocks nor which block is last (global)."""
    attn = bigbird(block_size=4, num_random_blocks=2)
    q, k, v = qkv_factory(1, 3, 50, 8, dtype=torch.float64)
    ref = attn(q, k, v)
    pad = 23
    qp, kp, vp = (torch.cat([x, 7 * torch.randn(1, 3, pad, 8, dtype=torch.float64)], 2) for x in (q, k, v))
    kpm = torch.arange(50 + pad)[None] < 50
    torch.testing.assert_close(attn(qp, kp, vp, key_padding_mask=kpm)[:, :, :50], ref)


def test_random_blocks_are_kept_in_eval(qkv_factory) -> None:
    q, k, v = qkv_factory(1, 3, 96, 8)
    sparse = bigbird(block_size=8, num_random_blocks=2, seed=3)
    no_random = bigbird(block_size=8, num_random_blocks=0, seed=3)
    out = sparse(q, k, v)
    assert not torch.allclose(out, no_random(q, k, v), atol=1e-4), "eval dropped the random blocks"
    assert not torch.allclose(out, dense_reference(q, k, v), atol=1e-4), "eval switched to full attention"
    assert torch.equal(out, sparse(q, k, v))
    assert torch.equal(out, bigbird(block_size=8, num_random_blocks=2, seed=3)(q, k, v)), "eval is not seeded"
    assert not torch.allclose(out, bigbird(block_size=8, num_random_blocks=2, seed=4)(q, k, v))


def test_training_redraws_reproducibly(qkv_factory) -> None:
    q, k, v = qkv_factory(1, 3, 96, 8)
    a, b = bigbird(block_size=8, seed=1).train(), bigbird(block_size=8, seed=1).train()
    first, second = a(q, k, v), a(q, k, v)
    assert not torch.allclose(first, second), "training should draw a fresh random pattern per forward"
    torch.testing.assert_close(b(q, k, v), first)
    torch.testing.assert_close(b(q, k, v), second)


def test_short_input_changes_no_mode(qkv_factory) -> None:
    """A batch too short for the sparse pattern is handled in place; the next long batch is still sparse."""
    attn, fresh = bigbird(block_size=8, seed=2), bigbird(block_size=8, seed=2)
    qs, ks, vs = qkv_factory(1, 3, 20, 8, seed=1)  # 3 blocks: the window covers everything
    torch.testing.assert_close(attn(qs, ks, vs), dense_reference(qs, ks, vs), atol=1e-6, rtol=1e-5)
    q, k, v = qkv_factory(1, 3, 128, 8, seed=2)
    out = attn(q, k, v)
    assert torch.equal(out, fresh(q, k, v))
    assert not torch.allclose(out, dense_reference(q, k, v), atol=1e-4)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="odd"):
        bigbird(num_window_blocks=2)
    with pytest.raises(ValueError, match="global_blocks"):
        bigbird(global_blocks="some")
