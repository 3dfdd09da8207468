"""Dense SDPA variant and the ``dense_reference`` oracle every other variant is tested against."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_peft.attention import build_attention
from lightning_peft.attention.sdpa import dense_reference


def test_reference_matches_the_textbook_formula(qkv_factory) -> None:
    q, k, v = qkv_factory(2, 3, 17, 8, dtype=torch.float64)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / 8**0.5
    torch.testing.assert_close(dense_reference(q, k, v), scores.softmax(-1) @ v)
    causal = scores.masked_fill(torch.ones(17, 17, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(dense_reference(q, k, v, causal=True), causal.softmax(-1) @ v)


def test_reference_prefix_keys_are_visible_to_every_causal_query(qkv_factory) -> None:
    P, T = 3, 9
    q, k, v = qkv_factory(1, 2, T, 8, num_prefix=P, dtype=torch.float64)
    out = dense_reference(q, k, v, causal=True, num_prefix=P)
    # Query 0 sees the three prefix keys and real key 0, nothing else.
    w = (q[:, :, :1] @ k[:, :, : P + 1].transpose(-1, -2) / 8**0.5).softmax(-1)
    torch.testing.assert_close(out[:, :, :1], w @ v[:, :, : P + 1])


def test_reference_padding_and_empty_rows(qkv_factory) -> None:
    q, k, v = qkv_factory(2, 2, 10, 8, dtype=torch.float64)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1, 6:] = False
    out = dense_reference(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(out[1], dense_reference(q[1:], k[1:, :, :6], v[1:, :, :6])[0])
    kpm[1] = False  # a sequence that is all padding: zeros, not NaN
    assert dense_reference(q, k, v, key_padding_mask=kpm)[1].abs().max() == 0


@pytest.mark.parametrize("num_prefix", [0, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_variant_equals_reference(causal: bool, padded: bool, num_prefix: int, qkv_factory) -> None:
    q, k, v = qkv_factory(2, 3, 21, 8, num_prefix=num_prefix, dtype=torch.float64)
    kpm = None
    if padded:
        kpm = torch.ones(2, 21 + num_prefix, dtype=torch.bool)
        kpm[0, -7:] = False
        kpm[1, :1] = False  # left padding too: causal query 0 of batch 1 may see nothing
    attn = build_attention("sdpa", num_heads=3, head_dim=8)
    out = attn(q, k, v, key_padding_mask=kpm, causal=causal, num_prefix=num_prefix, scale=0.3)
    ref = dense_reference(q, k, v, key_padding_mask=kpm, causal=causal, scale=0.3, num_prefix=num_prefix)
    torch.testing.assert_close(out, ref)


def test_sdpa_fast_path_is_the_fused_kernel_result(qkv_factory) -> None:
    q, k, v = qkv_factory(1, 2, 33, 16)
    attn = build_attention("sdpa", num_heads=2, head_dim=16)
    torch.testing.assert_close(
        attn(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )


def test_sdpa_fully_masked_sequence_is_zero_without_nan_gradients(qkv_factory) -> None:
    q, k, v = qkv_factory(2, 2, 6, 8, requires_grad=True)
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[1] = False
    out = build_attention("sdpa", num_heads=2, head_dim=8)(q, k, v, key_padding_mask=kpm, causal=True)
    assert out[1].abs().max() == 0
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
