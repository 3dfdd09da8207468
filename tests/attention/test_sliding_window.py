"""Sliding-window attention: exact limit, an explicit-mask oracle, HF Longformer parity, and O(n*w) memory."""

from __future__ import annotations

import pytest
import torch
from transformers import LongformerConfig
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from lightning_peft.attention import build_attention
from lightning_peft.attention.sdpa import dense_reference


def windowed_oracle(q, k, v, *, window, dilation, kpm=None, causal=False, num_prefix=0, global_mask=None):
    """Dense attention with the explicit Longformer mask (fine in a test: T is tiny)."""
    B, _, T, D = q.shape
    P = num_prefix
    diff = torch.arange(T)[None, :] - torch.arange(T)[:, None]  # key - query
    outs = []
    for h, d in enumerate(dilation):
        local = (diff.abs() <= d * (window // 2)) & (diff % d == 0)
        allowed = local[None].expand(B, T, T).clone()
        if global_mask is not None:
            allowed |= global_mask[:, None, :]  # every query sees the global keys
            allowed |= global_mask[:, :, None]  # global queries see every key
        if causal:
            allowed &= diff <= 0
        allowed = torch.cat([torch.ones(B, T, P, dtype=torch.bool), allowed], 2)  # prefix keys: always
        if kpm is not None:
            allowed &= kpm[:, None, :]
        scores = q[:, h] @ k[:, h].transpose(-1, -2) / D**0.5
        outs.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, h])
    return torch.stack(outs, 1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_prefix", [0, 3])
def test_window_covering_the_sequence_equals_dense(causal: bool, num_prefix: int, qkv_factory) -> None:
    T = 37
    q, k, v = qkv_factory(2, 3, T, 8, num_prefix=num_prefix, dtype=torch.float64)
    kpm = torch.ones(2, T + num_prefix, dtype=torch.bool)
    kpm[1, -6:] = False
    attn = build_attention("sliding_window", num_heads=3, head_dim=8, window=2 * T)  # window // 2 >= T - 1
    out = attn(q, k, v, key_padding_mask=kpm, causal=causal, num_prefix=num_prefix)
    ref = dense_reference(q, k, v, key_padding_mask=kpm, causal=causal, num_prefix=num_prefix)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1, :, :-6], ref[1, :, :-6])


def test_window_one_short_of_the_sequence_is_not_dense(qkv_factory) -> None:
    T = 20
    q, k, v = qkv_factory(1, 2, T, 8, dtype=torch.float64)
    out = build_attention("sliding_window", num_heads=2, head_dim=8, window=2 * (T - 2))(q, k, v)
    assert not torch.allclose(out, dense_reference(q, k, v))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_prefix", [0, 2])
@pytest.mark.parametrize("dilation", [[1, 1, 1], [1, 2, 3]])
def test_matches_the_explicit_mask(causal: bool, num_prefix: int, dilation: list[int], qkv_factory) -> None:
    T, window = 41, 6
    q, k, v = qkv_factory(2, 3, T, 8, num_prefix=num_prefix, dtype=torch.float64)
    kpm = torch.ones(2, T + num_prefix, dtype=torch.bool)
    kpm[1, -5:] = False
    gm = torch.zeros(2, T, dtype=torch.bool)
    gm[:, 0] = True
    gm[0, 17] = True
    attn = build_attention("sliding_window", num_heads=3, head_dim=8, window=window, dilation=dilation)
    for g in (None, gm):
        kw = dict(causal=causal, num_prefix=num_prefix, global_mask=g)
        out = attn(q, k, v, key_padding_mask=kpm, **kw)
        ref = windowed_oracle(q, k, v, window=window, dilation=dilation, kpm=kpm, **kw)
        torch.testing.assert_close(out[0], ref[0])
        torch.testing.assert_close(out[1, :, :-5], ref[1, :, :-5])


def _longformer(hidden: int, heads: int, window: int) -> LongformerSelfAttention:
    config = LongformerConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        attention_window=[window],
        attention_probs_dropout_prob=0.0,
    )
    layer = LongformerSelfAttention(config, layer_id=0).eval()
    with torch.no_grad():  # global projections = local ones, so both sides compute the same thing
        for name in ("query", "key", "value"):
            getattr(layer, f"{name}_global").load_state_dict(getattr(layer, name).state_dict())
    return layer


@pytest.mark.parametrize("with_global", [False, True])
def test_matches_hf_longformer_self_attention(with_global: bool) -> None:
    torch.manual_seed(0)
    B, T, H, D, window = 2, 32, 2, 8, 8
    layer = _longformer(H * D, H, window).double()
    hidden = torch.randn(B, T, H * D, dtype=torch.float64)
    real = torch.ones(B, T, dtype=torch.bool)
    real[1, 25:] = False
    glob = torch.zeros(B, T, dtype=torch.bool)
    if with_global:
        glob[:, 0] = True
        glob[0, 13] = True
    # HF's layer-level mask: -10000 padding, 0 local, +10000 global.
    hf_mask = torch.zeros(B, T, dtype=torch.float64).masked_fill(glob, 10000.0).masked_fill(~real, -10000.0)
    with torch.no_grad():
        expected = layer(
            hidden,
            attention_mask=hf_mask,
            is_index_masked=hf_mask < 0,
            is_index_global_attn=hf_mask > 0,
            is_global_attn=bool((hf_mask > 0).any()),
        )[0]  # (B, T, C)

        def heads(lin: torch.nn.Linear) -> torch.Tensor:
            return lin(hidden).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)

        attn = build_attention("sliding_window", num_heads=H, head_dim=D, window=window)
        out = attn(
            heads(layer.query),
            heads(layer.key),
            heads(layer.value),
            key_padding_mask=real,
            global_mask=glob if with_global else None,
        )
    out = out.transpose(1, 2).reshape(B, T, H * D)
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1, :25], expected[1, :25])


@pytest.mark.parametrize("dilation", [1, 2])
def test_no_tensor_grows_like_n_squared(dilation: int, largest_tensor) -> None:
    """At n=1024, window 16, nothing (masks included) comes near n*n elements, forward or backward."""
    n, window = 1024, 16
    q, k, v = (torch.randn(1, 1, n, 4, requires_grad=True) for _ in range(3))
    kpm = torch.ones(1, n, dtype=torch.bool)
    kpm[0, -100:] = False
    gm = torch.zeros(1, n, dtype=torch.bool)
    gm[0, :2] = True
    attn = build_attention("sliding_window", num_heads=1, head_dim=4, window=window, dilation=dilation)
    with largest_tensor() as probe:
        attn(q, k, v, key_padding_mask=kpm, global_mask=gm, causal=True).sum().backward()
    assert probe.largest <= 8 * n * window, f"largest tensor has {probe.largest} elements (n*n = {n * n})"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_prefix", [0, 2])
@pytest.mark.parametrize("dilation", [[1, 1], [1, 3]])
def test_sink_tokens_match_the_explicit_mask(
    causal: bool, num_prefix: int, dilation: list[int], qkv_factory
) -> None:
    """StreamingLLM's sinks: the first ``s`` real tokens (after left padding) are keys every query sees."""
    T, window, sinks = 29, 6, 3
    q, k, v = qkv_factory(2, 2, T, 8, num_prefix=num_prefix, dtype=torch.float64)
    kpm = torch.ones(2, T + num_prefix, dtype=torch.bool)
    kpm[1, num_prefix : num_prefix + 4] = False  # row 1: four left-padding tokens, its sinks are tokens 4-6
    first_real = torch.zeros(2, T, dtype=torch.bool)
    first_real[0, :sinks], first_real[1, 4 : 4 + sinks] = True, True
    attn = build_attention(
        "sliding_window", num_heads=2, head_dim=8, window=window, dilation=dilation, sink_tokens=sinks
    )
    out = attn(q, k, v, key_padding_mask=kpm, causal=causal, num_prefix=num_prefix)
    # The oracle: the window, plus the sink keys for every query (causal: only those not after it).
    P, diff = num_prefix, torch.arange(T)[None, :] - torch.arange(T)[:, None]  # key - query
    outs = []
    for h, d in enumerate(dilation):
        allowed = ((diff.abs() <= d * (window // 2)) & (diff % d == 0))[None] | first_real[:, None, :]
        if causal:
            allowed = allowed & (diff <= 0)
        allowed = torch.cat([torch.ones(2, T, P, dtype=torch.bool), allowed], 2) & kpm[:, None, :]
        scores = q[:, h] @ k[:, h].transpose(-1, -2) / 8**0.5
        outs.append(scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v[:, h])
    ref = torch.stack(outs, 1)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1, :, 4:], ref[1, :, 4:])  # padded queries: whatever
    plain = build_attention("sliding_window", num_heads=2, head_dim=8, window=window, dilation=dilation)
    assert not torch.allclose(out[0], plain(q, k, v, key_padding_mask=kpm, causal=causal, num_prefix=P)[0])


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="even"):
        build_attention("sliding_window", num_heads=2, head_dim=8, window=5)
    with pytest.raises(ValueError, match="dilation"):
        build_attention("sliding_window", num_heads=2, head_dim=8, dilation=[1, 2, 3])
    with pytest.raises(ValueError, match="sink_tokens must be an int >= 0"):
        build_attention("sliding_window", num_heads=2, head_dim=8, sink_tokens=-1)
