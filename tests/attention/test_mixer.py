"""MLP-Mixer token mixing: the token-mixing MLP, exact under padding, bounded by max_length."""

from __future__ import annotations

import pytest
import torch

from lightning_peft.attention import build_attention
from lightning_peft.attention.mixer import TokenMixingMLP


def mixer(**options: object) -> TokenMixingMLP:
    module = build_attention("mixer", num_heads=2, head_dim=8, max_length=24, **options)
    assert isinstance(module, TokenMixingMLP)
    return module


def test_mixes_tokens_with_one_mlp_shared_by_channels() -> None:
    module = mixer(token_hidden=5)
    x = torch.randn(2, 10, 16)
    hidden = torch.nn.functional.gelu(module.w1[:, :10] @ x + module.b1)  # (B, S, C)
    torch.testing.assert_close(module(x), module.w2[:10] @ hidden + module.b2[:10])
    assert sum(p.numel() for p in module.parameters()) == 5 * 24 + 5 + 24 * 5 + 24


@pytest.mark.parametrize("side", ["right", "left"])
def test_real_outputs_do_not_depend_on_padding(side: str) -> None:
    module = mixer()
    x = torch.randn(2, 13, 16)
    pad = torch.randn(2, 7, 16) * 10
    xp = torch.cat([x, pad], 1) if side == "right" else torch.cat([pad, x], 1)
    real = (torch.arange(20) < 13) if side == "right" else (torch.arange(20) >= 7)
    out = module(xp, real.expand(2, -1).clone())
    torch.testing.assert_close(out[:, real], module(x))
    assert out[:, ~real].abs().max() == 0


def test_unmasked_padding_would_leak() -> None:
    module = mixer()
    x = torch.randn(1, 13, 16)
    xp = torch.cat([x, torch.randn(1, 7, 16)], 1)
    assert not torch.allclose(module(xp)[:, :13], module(x), atol=1e-4)


def test_refuses_longer_than_max_length_and_needs_it() -> None:
    with pytest.raises(ValueError, match="max_length"):
        mixer()(torch.randn(1, 25, 16))
    with pytest.raises(ValueError, match="max_length"):
        build_attention("mixer", num_heads=2, head_dim=8)


def test_gradients_reach_the_token_mixing_weights() -> None:
    module = mixer()
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 8:] = False
    module(torch.randn(2, 12, 16), mask).pow(2).sum().backward()
    assert module.w1.grad is not None and module.w1.grad[:, :12].abs().sum() > 0
    assert module.w1.grad[:, 12:].abs().sum() == 0  # columns past the longest sequence are unused
