"""Linear attention (elu+1): formula oracle, padded keys out of the normaliser, chunked causal form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_peft.attention import build_attention


def oracle(q, k, v, kpm=None, causal=False, num_prefix=0):
    """``phi(q) phi(k)^T`` normalised per row, built as an explicit (T, Tk) matrix."""
    a = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)  # (B, H, T, Tk)
    T, Tk = q.shape[2], k.shape[2]
    if causal:
        kpos = torch.arange(Tk) - num_prefix
        a = a * ((kpos[None, :] <= torch.arange(T)[:, None]) | (kpos[None, :] < 0))
    if kpm is not None:
        a = a * kpm[:, None, None, :]
    return (a @ v) / a.sum(-1, keepdim=True)


@pytest.mark.parametrize("num_prefix", [0, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_the_explicit_formula(causal: bool, num_prefix: int, qkv_factory) -> None:
    q, k, v = qkv_factory(2, 2, 45, 8, num_prefix=num_prefix, dtype=torch.float64)
    kpm = torch.ones(2, 45 + num_prefix, dtype=torch.bool)
    kpm[1, -9:] = False
    attn = build_attention("linear", num_heads=2, head_dim=8, chunk_size=8)
    out = attn(q, k, v, key_padding_mask=kpm, causal=causal, num_prefix=num_prefix)
    ref = oracle(q, k, v, kpm, causal, num_prefix)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1, :, :-9], ref[1, :, :-9])


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_causal_result_does_not_depend_on_chunking(chunk_size: int, qkv_factory) -> None:
    q, k, v = qkv_factory(1, 2, 30, 8, dtype=torch.float64)
    ref = build_attention("linear", num_heads=2, head_dim=8, chunk_size=30)(q, k, v, causal=True)
    out = build_attention("linear", num_heads=2, head_dim=8, chunk_size=chunk_size)(q, k, v, causal=True)
    torch.testing.assert_close(out, ref)


def test_padded_keys_are_out_of_the_normaliser(qkv_factory) -> None:
    """fla #1263: letting padded keys into the normaliser shrinks every real output."""
    q, k, v = qkv_factory(1, 2, 32, 8, dtype=torch.float64)
    kpm = torch.arange(32)[None] < 12
    attn = build_attention("linear", num_heads=2, head_dim=8)
    out = attn(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(out[:, :, :12], attn(q[:, :, :12], k[:, :, :12], v[:, :, :12]))
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    leaky = (
        ((phi_q @ phi_k.transpose(-1, -2)) * kpm[:, None, None])
        @ v
        / (phi_q @ phi_k.transpose(-1, -2)).sum(-1, keepdim=True)
    )
    assert (leaky[:, :, :12] - out[:, :, :12]).abs().max() > 0.1


def test_causal_form_builds_no_n_by_d_by_d_tensor(largest_tensor) -> None:
    n, d = 1024, 16
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    attn = build_attention("linear", num_heads=1, head_dim=d, chunk_size=32)
    with largest_tensor() as probe:
        attn(q, k, v, causal=True).sum().backward()
    assert probe.largest < n * d * d // 8, probe.largest


def test_half_precision_is_computed_in_fp32(qkv_factory) -> None:
    q, k, v = qkv_factory(1, 2, 20, 8, dtype=torch.bfloat16)
    attn = build_attention("linear", num_heads=2, head_dim=8)
    out = attn(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), attn(q.float(), k.float(), v.float(), causal=True), atol=1e-2, rtol=1e-2
    )
