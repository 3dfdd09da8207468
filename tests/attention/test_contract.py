"""The battery every registered attention variant must pass, parametrised over the registry.

q/k/v variants get the (B, H, T, D) battery; token mixers (subclasses of ``TokenMixer``) get the (B, T, C)
one. A new variant joins both by registering itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_peft.attention import (
    AttentionVariant,
    TokenMixer,
    available_attention,
    build_attention,
    get_attention,
)
from lightning_peft.attention.sdpa import dense_reference

H, D, MAXLEN = 2, 8, 64
QKV_VARIANTS = [n for n in available_attention() if not issubclass(get_attention(n), TokenMixer)]
MIXERS = [n for n in available_attention() if issubclass(get_attention(n), TokenMixer)]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_attention(name, num_heads=H, head_dim=D, max_length=MAXLEN).eval()


def caps(name: str):
    return get_attention(name).capabilities


def padded_copy(x: torch.Tensor, length: int, seed: int) -> torch.Tensor:
    """``x`` (B, H, T, D) extended to ``length`` along T with random junk (padding must not matter)."""
    g = torch.Generator().manual_seed(seed)
    junk = 5 * torch.randn(*x.shape[:2], length - x.shape[2], x.shape[3], generator=g, dtype=x.dtype)
    return torch.cat([x.detach(), junk], 2).requires_grad_(True)


def test_registry_is_populated() -> None:
    assert {"sdpa", "sliding_window", "bigbird", "linformer", "performer", "linear"} <= set(QKV_VARIANTS)


def test_unknown_variant_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"Known variants: .*sdpa"):
        build_attention("sliding_windw", num_heads=H, head_dim=D)


@pytest.mark.parametrize("name", QKV_VARIANTS)
def test_constructible_with_the_three_common_arguments(name: str) -> None:
    module = build_attention(name, num_heads=12, head_dim=64, max_length=512)
    assert isinstance(module, AttentionVariant)
    assert module.name == name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", QKV_VARIANTS)
def test_output_shape_and_dtype(name: str, dtype: torch.dtype, qkv_factory) -> None:
    q, k, v = qkv_factory(3, H, 20, D, dtype=dtype)
    out = build(name)(q, k, v)
    assert out.shape == q.shape
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", QKV_VARIANTS)
def test_gradients_reach_q_k_v(name: str, qkv_factory) -> None:
    module = build(name)
    q, k, v = qkv_factory(2, H, 20, D, requires_grad=True)
    out = module(q, k, v)
    (out * torch.randn_like(out)).sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0
    for i, x in enumerate((q, k)):
        if x.grad is None:
            # Allowed only for an input the variant never reads (Reformer's shared QK, Synthesizer's keys).
            args = [q.detach(), k.detach(), v.detach()]
            args[i] = torch.randn_like(args[i])
            torch.testing.assert_close(
                module(*args), out.detach(), msg=f"input {'qk'[i]} is read, no gradient"
            )
        else:
            assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", QKV_VARIANTS)
def test_trailing_padding_does_not_change_real_tokens(name: str, causal: bool, qkv_factory) -> None:
    if not caps(name).padding_mask:
        pytest.skip(f"{name} declares no padding support")
    if causal and not caps(name).causal:
        pytest.skip(f"{name} is not causal")
    module, lengths, total = build(name), [20, 13], 27
    for b, real in enumerate(lengths):
        q, k, v = qkv_factory(1, H, real, D, seed=b, requires_grad=True)
        ref = module(q, k, v, causal=causal)
        qp, kp, vp = (padded_copy(x, total, seed=10 + b) for x in (q, k, v))
        kpm = torch.arange(total)[None] < real  # (1, total)
        out = module(qp, kp, vp, key_padding_mask=kpm, causal=causal)
        torch.testing.assert_close(out[:, :, :real], ref, atol=1e-5, rtol=1e-5)
        (out[:, :, :real] * torch.randn_like(ref)).sum().backward()
        if kp.grad is not None:  # None: the variant never reads keys
            assert kp.grad[:, :, real:].abs().max() == 0, "padded keys received gradient"
        assert vp.grad[:, :, real:].abs().max() == 0, "padded values received gradient"


@pytest.mark.parametrize("name", QKV_VARIANTS)
def test_batch_padding_mixes_lengths(name: str, qkv_factory) -> None:
    """Two sequences of different real lengths in one batch agree with their separate runs."""
    if not caps(name).padding_mask:
        pytest.skip(f"{name} declares no padding support")
    module = build(name)
    q, k, v = qkv_factory(2, H, 22, D)
    kpm = torch.ones(2, 22, dtype=torch.bool)
    kpm[1, 15:] = False
    out = module(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(out[:1], module(q[:1], k[:1], v[:1]), atol=1e-5, rtol=1e-5)
    alone = module(q[1:, :, :15], k[1:, :, :15], v[1:, :, :15])
    torch.testing.assert_close(out[1:, :, :15], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_prefix", [0, 3])
@pytest.mark.parametrize("name", QKV_VARIANTS)
def test_causal_does_not_leak_the_future(name: str, num_prefix: int, qkv_factory) -> None:
    if not caps(name).causal:
        pytest.skip(f"{name} is not causal")
    if num_prefix and not caps(name).prefix_keys:
        pytest.skip(f"{name} takes no prefix keys")
    module, T, cut = build(name), 30, 11
    q, k, v = qkv_factory(2, H, T, D, num_prefix=num_prefix)
    out = module(q, k, v, causal=True, num_prefix=num_prefix)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, cut:] = torch.randn_like(q2[:, :, cut:])
    k2[:, :, num_prefix + cut :] = 3 * torch.randn_like(k2[:, :, num_prefix + cut :])
    v2[:, :, num_prefix + cut :] = 3 * torch.randn_like(v2[:, :, num_prefix + cut :])
    out2 = module(q2, k2, v2, causal=True, num_prefix=num_prefix)
    torch.testing.assert_close(out2[:, :, :cut], out[:, :, :cut], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out2[:, :, cut:], out[:, :, cut:]), "the future had no effect at all"


@pytest.mark.parametrize("name", QKV_VARIANTS)
def test_prefix_keys_are_seen_and_masked_prefix_is_absent(name: str, qkv_factory) -> None:
    if not caps(name).prefix_keys:
        pytest.skip(f"{name} takes no prefix keys")
    module, P, T = build(name), 4, 18
    q, k, v = qkv_factory(2, H, T, D, num_prefix=P)
    with_prefix = module(q, k, v, num_prefix=P)
    without = module(q, k[:, :, P:], v[:, :, P:])
    assert not torch.allclose(with_prefix, without, atol=1e-4), "prefix keys were ignored"
    if caps(name).padding_mask:
        kpm = torch.ones(2, P + T, dtype=torch.bool)
        kpm[:, :P] = False
        masked = module(q, k, v, num_prefix=P, key_padding_mask=kpm)
        torch.testing.assert_close(masked, without, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", QKV_VARIANTS)
def test_global_tokens_attend_to_everything(name: str, qkv_factory) -> None:
    """A global query's output is the dense-attention row over every real key."""
    if not caps(name).global_tokens:
        pytest.skip(f"{name} has no global tokens")
    module = build(name)
    q, k, v = qkv_factory(2, H, 40, D)
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[1, 33:] = False
    gm = torch.zeros(2, 40, dtype=torch.bool)
    gm[:, 0] = True
    gm[0, 25] = True
    out = module(q, k, v, key_padding_mask=kpm, global_mask=gm)
    ref = dense_reference(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(out[0, :, [0, 25]], ref[0, :, [0, 25]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :, 0], ref[1, :, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", QKV_VARIANTS)
def test_eval_is_deterministic(name: str, qkv_factory) -> None:
    module = build(name)
    q, k, v = qkv_factory(2, H, 20, D)
    assert torch.equal(module(q, k, v), module(q, k, v))


@pytest.mark.parametrize("name", QKV_VARIANTS)
def test_bad_inputs_are_refused(name: str, qkv_factory) -> None:
    module = build(name)
    q, k, v = qkv_factory(1, H, 16, D)
    with pytest.raises(ValueError, match="head dim"):
        module(q[..., :4], k, v)
    with pytest.raises(ValueError, match=f"head dim {D + 1}"):
        module(torch.randn(1, H, 16, D + 1), torch.randn(1, H, 16, D + 1), torch.randn(1, H, 16, D + 1))
    with pytest.raises(ValueError, match="key_padding_mask"):
        module(q, k, v, key_padding_mask=torch.ones(1, 16))
    if not caps(name).causal:
        with pytest.raises(ValueError, match="causal"):
            module(q, k, v, causal=True)
    if not caps(name).prefix_keys:
        qp, kp, vp = qkv_factory(1, H, 16, D, num_prefix=2)
        with pytest.raises(ValueError, match="prefix"):
            module(qp, kp, vp, num_prefix=2)
    if not caps(name).global_tokens:
        with pytest.raises(ValueError, match="global"):
            module(q, k, v, global_mask=torch.zeros(1, 16, dtype=torch.bool))
    if caps(name).max_length:
        ql, kl, vl = qkv_factory(1, H, MAXLEN + 1, D)
        with pytest.raises(ValueError, match="max_length"):
            module(ql, kl, vl)


@pytest.mark.parametrize("name", MIXERS or [pytest.param("none", marks=pytest.mark.skip("no token mixers"))])
def test_token_mixer_contract(name: str) -> None:
    torch.manual_seed(0)
    mixer = build_attention(name, num_heads=H, head_dim=D, max_length=MAXLEN).eval()
    x = torch.randn(2, 20, H * D, requires_grad=True)  # (B, T, C)
    out = mixer(x, None)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(mixer(x, None), out)
    if get_attention(name).capabilities.padding_mask:
        real = 13
        xp = torch.cat([x.detach()[:, :real], 5 * torch.randn(2, 7, H * D)], 1)
        kpm = torch.arange(20)[None].expand(2, 20) < real
        torch.testing.assert_close(
            mixer(xp, kpm)[:, :real], mixer(x.detach()[:, :real], None), atol=1e-5, rtol=1e-5
        )
