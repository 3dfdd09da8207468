"""Reformer LSH attention: exact at a single chunk, exact under padding, causal, deterministic in eval."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_peft.attention import build_attention
from lightning_peft.attention.reformer import ReformerAttention


def shared_qk_reference(q: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """Softmax attention with keys = normalised queries and no attention to self (unless nothing else)."""
    T = q.shape[2]
    keys = q / q.norm(dim=-1, keepdim=True)
    logits = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    blocked = torch.eye(T, dtype=torch.bool)
    if causal:
        blocked = blocked | torch.ones(T, T, dtype=torch.bool).triu(1)
        blocked[0, 0] = False  # with causal masking the first token sees only itself
    return logits.masked_fill(blocked, float("-inf")).softmax(-1) @ v


def reformer(**options: object) -> ReformerAttention:
    module = build_attention("reformer", num_heads=2, head_dim=8, max_length=64, **options)
    assert isinstance(module, ReformerAttention)
    return module.eval()


def test_single_chunk_with_many_rounds_is_exact_shared_qk_attention(qkv_factory) -> None:
    q, _, v = qkv_factory(length=20)
    out = reformer(bucket_size=32, n_hashes=6)(q, q, v)
    torch.testing.assert_close(out, shared_qk_reference(q, v), atol=1e-5, rtol=1e-5)


def test_single_chunk_causal_without_hashing_is_exact(qkv_factory) -> None:
    q, _, v = qkv_factory(length=20)
    out = reformer(bucket_size=32, n_buckets=1, n_hashes=3)(q, q, v, causal=True)
    torch.testing.assert_close(out, shared_qk_reference(q, v, causal=True), atol=1e-5, rtol=1e-5)


def test_keys_are_the_normalised_queries(qkv_factory) -> None:
    q, k, v = qkv_factory(length=24)
    module = reformer(bucket_size=4, n_hashes=2)
    torch.testing.assert_close(module(q, k, v), module(q, torch.randn_like(k), v))


def test_hashing_restricts_attention(qkv_factory) -> None:
    q, _, v = qkv_factory(length=48)
    out = reformer(bucket_size=4, n_hashes=1)(q, q, v)
    assert out.shape == v.shape and torch.isfinite(out).all()
    assert (out - shared_qk_reference(q, v)).abs().max() > 1e-3  # small buckets: not full attention


@pytest.mark.parametrize("side", ["right", "left"])
def test_real_outputs_do_not_depend_on_padding(qkv_factory, side: str) -> None:
    q, _, v = qkv_factory(length=21)
    module = reformer(bucket_size=4, n_hashes=3)
    alone = module(q, q, v)
    pad_q, pad_v = torch.randn(2, 2, 11, 8) * 5, torch.randn(2, 2, 11, 8) * 5
    if side == "right":
        qp, vp = torch.cat([q, pad_q], 2), torch.cat([v, pad_v], 2)
        real = torch.arange(32) < 21
    else:
        qp, vp = torch.cat([pad_q, q], 2), torch.cat([pad_v, v], 2)
        real = torch.arange(32) >= 11
    mask = real.expand(2, -1).clone()
    padded = module(qp, qp, vp, key_padding_mask=mask)
    torch.testing.assert_close(padded[:, :, real], alone)


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_get_no_weight(qkv_factory, causal: bool) -> None:
    q, _, v = qkv_factory(length=16)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[0, 10:] = False
    module = reformer(bucket_size=4, n_hashes=2)
    v2 = v.clone()
    v2[0, :, 10:] += 100.0
    a = module(q, q, v, key_padding_mask=mask, causal=causal)
    b = module(q, q, v2, key_padding_mask=mask, causal=causal)
    torch.testing.assert_close(a[0, :, :10], b[0, :, :10])
    assert torch.isfinite(a).all()


def test_causal_outputs_ignore_the_future(qkv_factory) -> None:
    q, _, v = qkv_factory(length=32)
    module = reformer(bucket_size=4, n_hashes=2)
    before = module(q, q, v, causal=True)
    q2, v2 = q.clone(), v.clone()
    q2[:, :, 20:] = torch.randn_like(q2[:, :, 20:])  # new future tokens move the buckets and chunks
    v2[:, :, 20:] += 10.0
    after = module(q2, q2, v2, causal=True)
    torch.testing.assert_close(after[:, :, :20], before[:, :, :20])


def test_eval_rotations_are_fixed_and_training_resamples(qkv_factory) -> None:
    q, _, v = qkv_factory(length=48)
    module = reformer(bucket_size=4, n_hashes=1, seed=3)
    torch.testing.assert_close(module(q, q, v), reformer(bucket_size=4, n_hashes=1, seed=3)(q, q, v))
    assert not torch.equal(module(q, q, v), reformer(bucket_size=4, n_hashes=1, seed=4)(q, q, v))
    module.train()
    assert not torch.equal(module(q, q, v), module(q, q, v))


def test_gradients_reach_queries_and_values(qkv_factory) -> None:
    q, _, v = qkv_factory(length=24, requires_grad=True)
    reformer(bucket_size=4)(q, q, v).sum().backward()
    assert q.grad is not None and v.grad is not None and q.grad.abs().sum() > 0


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="n_buckets"):
        reformer(n_buckets=3)
    with pytest.raises(ValueError, match="bucket_size"):
        reformer(bucket_size=0)
