"""Linformer: identity limit, slicing to the actual length, sharing modes, padding story, refusals."""

from __future__ import annotations

import pytest
import torch

from lightning_peft.attention import build_attention
from lightning_peft.attention.sdpa import dense_reference


def linformer(max_length: int, **options):
    torch.manual_seed(0)
    return build_attention("linformer", num_heads=3, head_dim=8, max_length=max_length, **options).double()


@pytest.mark.parametrize("sharing", ["none", "headwise", "kv"])
def test_identity_projections_with_k_equal_n_are_dense(sharing: str, qkv_factory) -> None:
    n = 24
    attn = linformer(n, proj_dim=n, sharing=sharing)
    with torch.no_grad():
        for p in (attn.E, attn.F):
            if p is not None:
                p.copy_(torch.eye(n).expand_as(p))
    q, k, v = qkv_factory(2, 3, n, 8, dtype=torch.float64)
    torch.testing.assert_close(attn(q, k, v, scale=0.4), dense_reference(q, k, v, scale=0.4))


def test_random_projections_are_not_dense(qkv_factory) -> None:
    q, k, v = qkv_factory(2, 3, 24, 8, dtype=torch.float64)
    assert not torch.allclose(linformer(24, proj_dim=24)(q, k, v), dense_reference(q, k, v), atol=1e-3)


def test_projections_are_sliced_to_the_actual_length(qkv_factory) -> None:
    attn = linformer(64, proj_dim=16, sharing="none")
    q, k, v = qkv_factory(2, 3, 20, 8, dtype=torch.float64)
    kp = attn.E[:, :, :20] @ k  # (B, H, 16, D)
    vp = attn.F[:, :, :20] @ v
    expected = (q @ kp.transpose(-1, -2) / 8**0.5).softmax(-1) @ vp
    torch.testing.assert_close(attn(q, k, v), expected)


def test_sharing_modes_own_the_documented_parameters() -> None:
    counts = {
        s: sum(p.numel() for p in linformer(64, proj_dim=16, sharing=s).parameters())
        for s in ("none", "headwise", "kv")
    }
    assert counts == {"none": 2 * 3 * 16 * 64, "headwise": 2 * 16 * 64, "kv": 16 * 64}
    assert linformer(8, proj_dim=256).proj_dim == 8  # capped at max_length


def test_padded_keys_are_zeroed_before_projection(qkv_factory) -> None:
    """Junk in padded positions never reaches the projected keys/values (masking after would be too late)."""
    attn = linformer(32, proj_dim=8)
    q, k, v = qkv_factory(1, 3, 32, 8, dtype=torch.float64)
    kpm = torch.arange(32)[None] < 20
    out = attn(q, k, v, key_padding_mask=kpm)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 20:] = 1e3
    v2[:, :, 20:] = -1e3
    torch.testing.assert_close(attn(q, k2, v2, key_padding_mask=kpm), out)
    torch.testing.assert_close(out[:, :, :20], attn(q[:, :, :20], k[:, :, :20], v[:, :, :20]))


def test_refusals_are_clear(qkv_factory) -> None:
    with pytest.raises(ValueError, match="needs max_length"):
        build_attention("linformer", num_heads=3, head_dim=8)
    attn = linformer(16)
    q, k, v = qkv_factory(1, 3, 16, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot do causal"):
        attn(q, k, v, causal=True)
    q, k, v = qkv_factory(1, 3, 17, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="exceeds max_length=16"):
        attn(q, k, v)
    with pytest.raises(ValueError, match="sharing"):
        linformer(16, sharing="all")
