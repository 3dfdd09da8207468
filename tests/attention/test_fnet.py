"""FNet: the same Fourier mixing as transformers' FNet, and outputs of real tokens that ignore padding."""

from __future__ import annotations

import pytest
import torch
from transformers import FNetConfig
from transformers.models.fnet.modeling_fnet import FNetBasicFourierTransform

from lightning_peft.attention import build_attention
from lightning_peft.attention.fnet import FNetMixer, pack_real_tokens


def hf_fourier() -> FNetBasicFourierTransform:
    config = FNetConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        intermediate_size=32,
        max_position_embeddings=64,
        use_tpu_fourier_optimizations=False,
    )
    return FNetBasicFourierTransform(config)


def fnet() -> FNetMixer:
    module = build_attention("fnet", num_heads=2, head_dim=8, max_length=64)
    assert isinstance(module, FNetMixer)
    return module


def test_matches_transformers_fnet_on_unpadded_input() -> None:
    x = torch.randn(3, 19, 16)
    torch.testing.assert_close(fnet()(x), hf_fourier()(x)[0])


@pytest.mark.parametrize("side", ["right", "left"])
def test_real_tokens_match_transformers_on_each_unpadded_sequence(side: str) -> None:
    lengths = [19, 7, 12]
    seqs = [torch.randn(n, 16) for n in lengths]
    T = max(lengths)
    x = torch.randn(3, T, 16) * 10  # padding content must not matter
    mask = torch.zeros(3, T, dtype=torch.bool)
    for i, (n, s) in enumerate(zip(lengths, seqs, strict=True)):
        span = slice(0, n) if side == "right" else slice(T - n, T)
        x[i, span], mask[i, span] = s, True
    out = fnet()(x, mask)
    for i, (n, s) in enumerate(zip(lengths, seqs, strict=True)):
        torch.testing.assert_close(out[i][mask[i]], hf_fourier()(s[None])[0][0])
        if n < T:
            assert out[i][~mask[i]].abs().max() == 0


def test_fft_over_the_padded_length_would_change_real_outputs() -> None:
    """The bug this variant avoids (transformers #14359): padding changes the HF outputs of real tokens."""
    x = torch.randn(1, 10, 16)
    padded = torch.cat([x, torch.zeros(1, 6, 16)], 1)
    assert not torch.allclose(hf_fourier()(padded)[0][:, :10], hf_fourier()(x)[0], atol=1e-3)
    mask = (torch.arange(16) < 10)[None]
    torch.testing.assert_close(fnet()(padded, mask)[:, :10], fnet()(x))


def test_pack_real_tokens_is_stable() -> None:
    mask = torch.tensor([[False, True, False, True, True]])
    order, lengths = pack_real_tokens(mask)
    assert order.tolist() == [[1, 3, 4, 0, 2]] and lengths.tolist() == [3]


def test_low_precision_is_computed_in_fp32_and_returned_in_kind() -> None:
    x = torch.randn(2, 8, 16)
    out = fnet()(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fnet()(x.to(torch.bfloat16).float()), atol=0.1, rtol=0.02)


def test_gradients_flow_and_fnet_has_no_parameters() -> None:
    x = torch.randn(2, 8, 16, requires_grad=True)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    module = fnet()
    module(x, mask).pow(2).sum().backward()
    assert x.grad is not None and x.grad[1, :5].abs().sum() > 0 and x.grad[1, 5:].abs().sum() == 0
    assert not list(module.parameters()) and not module.capabilities.causal
