"""Performer (FAVOR+): error falls with more features, fp32 features, seeded redraws, causal without n*m*d."""

from __future__ import annotations

import pytest
import torch

from lightning_peft.attention import build_attention
from lightning_peft.attention.performer import orthogonal_random_features
from lightning_peft.attention.sdpa import dense_reference


def performer(**options):
    return build_attention("performer", num_heads=2, head_dim=16, **options).eval()


def relative_error(nb_features: int, causal: bool) -> float:
    """Mean over 4 seeds of |performer - softmax| / |softmax| on moderate-scale inputs."""
    errors = []
    for seed in range(4):
        g = torch.Generator().manual_seed(100 + seed)
        q, k = (0.6 * torch.randn(1, 2, 64, 16, generator=g) for _ in range(2))
        v = torch.randn(1, 2, 64, 16, generator=g)
        out = performer(nb_features=nb_features, seed=seed)(q, k, v, causal=causal)
        ref = dense_reference(q, k, v, causal=causal)
        errors.append(((out - ref).norm() / ref.norm()).item())
    return sum(errors) / len(errors)


@pytest.mark.parametrize("causal", [False, True])
def test_error_falls_as_features_grow(causal: bool) -> None:
    errors = {m: relative_error(m, causal) for m in (8, 32, 128, 512)}
    print(f"performer relative error vs softmax (causal={causal}):", errors)
    assert errors[32] < 0.8 * errors[8]
    assert errors[128] < 0.8 * errors[32]
    assert errors[512] < 0.8 * errors[128]
    assert errors[512] < 0.5 * errors[8]
    assert errors[512] < 0.3


def test_orthogonal_features_are_orthogonal_in_blocks() -> None:
    w = orthogonal_random_features(32, 16, torch.Generator().manual_seed(0))
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16), atol=1e-5, rtol=0)
    assert w.shape == (32, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_inputs_with_large_magnitude_stay_finite(dtype: torch.dtype, causal: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (30 * torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    attn = performer(nb_features=64)
    out = attn(q.to(dtype), k.to(dtype), v.to(dtype), causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # Features run in fp32: the half-precision result is the fp32 one rounded (not a different computation).
    ref = attn(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), causal=causal)
    torch.testing.assert_close(out.float(), ref, atol=0.3, rtol=2e-2)


def test_features_redraw_on_schedule_deterministically(qkv_factory) -> None:
    a, b = performer(redraw_interval=3, seed=5).train(), performer(redraw_interval=3, seed=5).train()
    q, k, v = qkv_factory(1, 2, 12, 16)
    start = a.projection.clone()
    for _ in range(3):
        a(q, k, v)
    assert torch.equal(a.projection, start), "redrew before the interval"
    a(q, k, v)  # 4th training forward: redraw
    assert not torch.equal(a.projection, start)
    for _ in range(4):
        b(q, k, v)
    assert torch.equal(a.projection, b.projection), "redraws are not reproducible"
    a.eval()
    frozen = a.projection.clone()
    for _ in range(5):
        a(q, k, v)
    assert torch.equal(a.projection, frozen), "features changed in eval"
    assert {"projection", "steps", "draws"} <= set(a.state_dict())


def test_padding_is_on_key_features_not_values(qkv_factory) -> None:
    attn = performer(nb_features=64)
    q, k, v = qkv_factory(1, 2, 24, 16)
    kpm = torch.arange(24)[None] < 15
    out = attn(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(
        out[:, :, :15], attn(q[:, :, :15], k[:, :, :15], v[:, :, :15]), atol=1e-5, rtol=1e-5
    )
    # Masking V only would keep padded keys in the normaliser and shrink the output: measurably different.
    v_masked = attn(q, k, v * kpm[:, None, :, None])
    assert (v_masked[:, :, :15] - out[:, :, :15]).abs().max() > 1e-2


def test_causal_form_builds_no_n_by_m_by_d_tensor(largest_tensor) -> None:
    n, m, d = 256, 32, 16
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    attn = build_attention("performer", num_heads=1, head_dim=d, nb_features=m, chunk_size=32)
    with largest_tensor() as probe:
        attn(q, k, v, causal=True).sum().backward()
    assert probe.largest < n * m * d // 8, probe.largest
