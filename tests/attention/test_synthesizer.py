"""Synthesizer: the three modes' logits and parameters, exact padding and causal masking."""

from __future__ import annotations

import pytest
import torch

from lightning_peft.attention import build_attention
from lightning_peft.attention.synthesizer import SynthesizerAttention

H, D, N = 2, 8, 32


def synth(**options: object) -> SynthesizerAttention:
    module = build_attention("synthesizer", num_heads=H, head_dim=D, max_length=N, **options)
    assert isinstance(module, SynthesizerAttention)
    return module


@pytest.mark.parametrize(
    ("options", "n_params"),
    [
        ({"mode": "dense", "hidden": 4}, H * (D * 4 + 4 + 4 * N + N)),
        ({"mode": "random"}, H * N * N),
        ({"mode": "factorized_random", "rank": 3}, 2 * H * N * 3),
        ({"mode": "random", "trainable": False}, 0),
    ],
)
def test_modes_have_their_parameters_and_output_shape(qkv_factory, options: dict, n_params: int) -> None:
    module = synth(**options)
    assert sum(p.numel() for p in module.parameters()) == n_params
    q, k, v = qkv_factory(length=20, heads=H, dim=D)
    assert module(q, k, v).shape == v.shape


def test_random_mode_uses_its_logits_and_ignores_the_input(qkv_factory) -> None:
    module = synth(mode="random")
    q, k, v = qkv_factory(length=12, heads=H, dim=D)
    expected = module.random_logits[:, :12, :12].softmax(-1) @ v
    torch.testing.assert_close(module(q, k, v), expected)
    torch.testing.assert_close(module(torch.randn_like(q), torch.randn_like(k), v), expected)


def test_factorized_random_is_a_low_rank_product(qkv_factory) -> None:
    module = synth(mode="factorized_random", rank=2)
    q, k, v = qkv_factory(length=10, heads=H, dim=D)
    logits = module.factor_left[:, :10] @ module.factor_right[:, :10].transpose(-1, -2)
    assert torch.linalg.matrix_rank(logits[0]).item() <= 2
    torch.testing.assert_close(module(q, k, v), logits.softmax(-1) @ v)


def test_dense_mode_is_a_per_token_mlp_of_the_query(qkv_factory) -> None:
    module = synth(mode="dense")
    q, k, v = qkv_factory(length=10, heads=H, dim=D)
    hidden = torch.relu(q @ module.w1[None] + module.b1)  # (B, H, T, hidden)
    logits = hidden @ module.w2[None, :, :, :10] + module.b2[..., :10]
    torch.testing.assert_close(module(q, k, v), logits.softmax(-1) @ v)
    assert not torch.allclose(module(q, k, v), module(torch.randn_like(q), k, v))


def test_fixed_random_logits_are_seeded_buffers() -> None:
    a, b = synth(mode="random", trainable=False, seed=1), synth(mode="random", trainable=False, seed=1)
    torch.testing.assert_close(a.random_logits, b.random_logits)
    assert "random_logits" in dict(a.named_buffers())


@pytest.mark.parametrize("mode", ["dense", "random", "factorized_random"])
def test_padding_is_exact(qkv_factory, mode: str) -> None:
    module = synth(mode=mode)
    q, k, v = qkv_factory(length=14, heads=H, dim=D)
    alone = module(q, k, v)
    pad = torch.randn(2, H, 6, D) * 10
    qp, kp, vp = (torch.cat([x, pad], 2) for x in (q, k, v))
    mask = (torch.arange(20) < 14).expand(2, -1)
    torch.testing.assert_close(module(qp, kp, vp, key_padding_mask=mask)[:, :, :14], alone)


@pytest.mark.parametrize("mode", ["dense", "random", "factorized_random"])
def test_causal_ignores_the_future(qkv_factory, mode: str) -> None:
    module = synth(mode=mode)
    q, k, v = qkv_factory(length=16, heads=H, dim=D)
    before = module(q, k, v, causal=True)
    q2, v2 = q.clone(), v.clone()
    q2[:, :, 9:] += 3.0
    v2[:, :, 9:] += 3.0
    torch.testing.assert_close(module(q2, k, v2, causal=True)[:, :, :9], before[:, :, :9])
    torch.testing.assert_close(before[:, :, 0], v[:, :, 0])  # the first token sees only itself


def test_gradients_reach_the_synthesised_logits(qkv_factory) -> None:
    module = synth(mode="factorized_random")
    q, k, v = qkv_factory(length=10, heads=H, dim=D)
    module(q, k, v).pow(2).sum().backward()
    assert module.factor_left.grad is not None and module.factor_left.grad.abs().sum() > 0


def test_needs_max_length_and_refuses_longer_inputs(qkv_factory) -> None:
    with pytest.raises(ValueError, match="max_length"):
        build_attention("synthesizer", num_heads=H, head_dim=D)
    q, k, v = qkv_factory(length=N + 1, heads=H, dim=D)
    with pytest.raises(ValueError, match="exceeds max_length"):
        synth()(q, k, v)
    with pytest.raises(ValueError, match="mode"):
        synth(mode="dense_factorized")
