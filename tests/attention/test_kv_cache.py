"""Causal variants with a KV cache: a cached decoding step must return what the full forward returns.

Cached keys are earlier tokens of the sequence, not prefix keys: a windowed variant that takes them for
prefix keys lets every new query see the whole past. Checked three ways: on the contract's tensors (every
causal variant, against its own full forward and, for the sliding window, an explicit windowed softmax), in
tiny GPT-2 and Llama models (cached step logits == full forward logits, past the window), and through
``generate`` (greedy tokens equal with and without the cache). Variants that cannot honour a cache refuse it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_peft.attention import (
    TokenMixer,
    available_attention,
    build_attention,
    get_attention,
    swap_attention,
)
from tests.models import TINY_CONFIGS, VOCAB

H, D, MAXLEN = 2, 8, 64
WINDOW = 8
CAUSAL = [n for n in available_attention() if get_attention(n).capabilities.causal]
CACHED = [n for n in CAUSAL if get_attention(n).capabilities.kv_cache]
REFUSING = [  # q/k/v variants only: token mixers have no keys and replace encoder attention only
    n
    for n in available_attention()
    if not get_attention(n).capabilities.kv_cache and not issubclass(get_attention(n), TokenMixer)
]
# Options that make each variant do its non-trivial thing on short inputs (windows, chunks, buckets smaller
# than the sequence); a new causal variant joins the tests with its defaults.
OPTIONS: dict[str, dict[str, Any]] = {
    "sliding_window": {"window": WINDOW},
    "linear": {"chunk_size": 4},
    "performer": {"nb_features": 32, "chunk_size": 4},
    "reformer": {"bucket_size": 4},
}
# Further settings of the cached variants whose positions matter: dilation, the synthesised-logit modes.
EXTRA_CASES = [
    ("sliding_window", {"window": WINDOW, "dilation": [1, 2]}),
    ("sliding_window", {"window": WINDOW, "sink_tokens": 2}),
    ("sliding_window", {"window": WINDOW, "dilation": [1, 2], "sink_tokens": 4}),
    ("synthesizer", {"mode": "random"}),
    ("synthesizer", {"mode": "factorized_random"}),
]
TENSOR_CASES = [(n, OPTIONS.get(n, {})) for n in CACHED] + EXTRA_CASES
# Variants that compute in float32 whatever the input dtype, by design (features, softmax of logits): in a
# float64 model they round where the other variants do not.
FLOAT32_INSIDE = {"performer", "synthesizer"}


def case_id(case: tuple[str, dict[str, Any]]) -> str:
    name, options = case
    return name + "".join(f"-{k}={v}" for k, v in options.items() if k not in OPTIONS.get(name, {}))


def test_every_causal_variant_either_takes_a_cache_or_refuses_it() -> None:
    assert {"sdpa", "sliding_window", "linear", "performer", "synthesizer"} <= set(CACHED)
    assert "reformer" in REFUSING  # its keys are the queries of earlier tokens, which a cache does not keep


# ------------------------------------------------------------------------------------------- tensor level
def cache_inputs(prefix: int, total: int = 30, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """float64 q (B, H, T, D), k/v (B, H, P + T, D), and a key mask with left padding in row 0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, H, total, D, generator=g, dtype=torch.float64)
    k = torch.randn(2, H, prefix + total, D, generator=g, dtype=torch.float64)
    v = torch.randn(2, H, prefix + total, D, generator=g, dtype=torch.float64)
    mask = torch.ones(2, prefix + total, dtype=torch.bool)
    mask[0, prefix : prefix + 3] = False  # three left-padding tokens in the first row
    return q, k, v, mask


@pytest.mark.parametrize("cached", [29, 17], ids=["one-new-token", "thirteen-new-tokens"])
@pytest.mark.parametrize("prefix", [0, 3])
@pytest.mark.parametrize("case", TENSOR_CASES, ids=case_id)
def test_cached_call_equals_the_full_causal_call(
    case: tuple[str, dict[str, Any]], prefix: int, cached: int
) -> None:
    name, options = case
    if prefix and not get_attention(name).capabilities.prefix_keys:
        pytest.skip(f"{name} takes no prefix keys")
    torch.manual_seed(0)
    attn = build_attention(name, num_heads=H, head_dim=D, max_length=MAXLEN, **options).double().eval()
    q, k, v, mask = cache_inputs(prefix)
    full = attn(q, k, v, key_padding_mask=mask, causal=True, num_prefix=prefix)  # (B, H, T, D)
    step = attn(
        q[:, :, cached:], k, v, key_padding_mask=mask, causal=True, num_prefix=prefix, num_cached=cached
    )
    atol = 1e-5 if name in FLOAT32_INSIDE else 1e-10
    torch.testing.assert_close(step, full[:, :, cached:], atol=atol, rtol=atol)


def windowed_softmax(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, prefix: int, cached: int) -> Tensor:
    """Explicit causal sliding-window attention for queries at tokens ``cached ..``: query token ``t`` sees
    the prefix keys and the real tokens ``t - WINDOW // 2 .. t``."""
    qpos = torch.arange(q.shape[2])[:, None] + cached  # (Tq, 1)
    kpos = torch.arange(k.shape[2])[None, :] - prefix  # (1, Tk); prefix keys < 0
    allowed = (kpos < 0) | ((kpos <= qpos) & (kpos >= qpos - WINDOW // 2))  # (Tq, Tk)
    allowed = allowed[None, None] & mask[:, None, None, :]  # (B, 1, Tq, Tk)
    scores = (q @ k.transpose(-1, -2)) * D**-0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("prefix", [0, 3])
def test_cached_sliding_window_matches_the_explicit_window(prefix: int) -> None:
    attn = build_attention("sliding_window", num_heads=H, head_dim=D, window=WINDOW)
    q, k, v, mask = cache_inputs(prefix)
    for cached in (29, 17):
        step = attn(
            q[:, :, cached:], k, v, key_padding_mask=mask, causal=True, num_prefix=prefix, num_cached=cached
        )
        expected = windowed_softmax(q[:, :, cached:], k, v, mask, prefix, cached)
        torch.testing.assert_close(step, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", REFUSING)
def test_a_variant_without_cache_support_refuses_cached_keys(name: str) -> None:
    attn = build_attention(name, num_heads=H, head_dim=D, max_length=MAXLEN, **OPTIONS.get(name, {}))
    q, k, v, _ = cache_inputs(0)
    causal = get_attention(name).capabilities.causal
    with pytest.raises(ValueError, match=rf"{name}.*KV cache.*use_cache=False.*sliding_window"):
        attn(q[:, :, 20:], k, v, causal=causal, num_cached=20)


def test_cached_keys_must_add_up() -> None:
    attn = build_attention("sdpa", num_heads=H, head_dim=D)
    q, k, v, _ = cache_inputs(0)
    with pytest.raises(ValueError, match=r"num_prefix \+ num_cached \+ Tq = 0 \+ 5 \+ 10"):
        attn(q[:, :, 20:], k, v, causal=True, num_cached=5)


def test_global_tokens_with_a_cache_are_refused() -> None:
    attn = build_attention("sliding_window", num_heads=H, head_dim=D, window=WINDOW)
    q, k, v, _ = cache_inputs(0)
    with pytest.raises(ValueError, match=r"global tokens.*KV cache"):
        attn(q[:, :, 20:], k, v, causal=True, num_cached=20, global_mask=torch.zeros(2, 10, dtype=torch.bool))


# -------------------------------------------------------------------------------------------- model level
def causal_lm(family: str, name: str, options: dict[str, Any]) -> nn.Module:
    """A tiny float64 GPT-2 / Llama LM running variant ``name``. The LM head is not tied to the input
    embedding: tied, a random tiny GPT-2 greedily repeats the last token whatever attention sees."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=VOCAB, tie_word_embeddings=False, **TINY_CONFIGS[family])
    model = AutoModelForCausalLM.from_config(config).eval()
    swap_attention(model, name, **options)
    return model.double()  # after the swap: the variant's own parameters too


def prompt(length: int) -> dict[str, Tensor]:
    ids = torch.randint(2, VOCAB, (2, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first row, as generate() batches prompts
    return {"input_ids": ids, "attention_mask": mask}


FAMILIES = ["gpt2", "llama"]
MODEL_CASES = [n for n in CACHED] + [
    ("sliding_window", {"window": WINDOW, "dilation": [1, 2]}),
    ("sliding_window", {"window": WINDOW, "sink_tokens": 2}),
]


def model_case(case: str | tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    return (case, OPTIONS.get(case, {})) if isinstance(case, str) else case


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: case_id(model_case(c)))
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_step_logits_equal_the_full_forward_past_the_window(family: str, case: Any) -> None:
    name, options = model_case(case)
    model = causal_lm(family, name, options)
    inputs = prompt(20)  # 20 tokens, window 8
    tol = 1e-5 if name in FLOAT32_INSIDE else 1e-9
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        full = model(**inputs).logits  # (B, 20, V)
        for cut in (19, 11):  # one new token; nine new tokens at once
            head = model(input_ids=ids[:, :cut], attention_mask=mask[:, :cut], use_cache=True)
            step = model(
                input_ids=ids[:, cut:], attention_mask=mask, past_key_values=head.past_key_values
            ).logits
            torch.testing.assert_close(step, full[:, cut:], atol=tol, rtol=tol)


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: case_id(model_case(c)))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_is_the_same_with_and_without_the_cache(family: str, case: Any) -> None:
    name, options = model_case(case)
    model = causal_lm(family, name, options)
    kw = dict(max_new_tokens=22, min_new_tokens=22, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(**prompt(6), **kw, use_cache=True)
        recomputed = model.generate(**prompt(6), **kw, use_cache=False)
    assert cached.shape[1] == 28 > WINDOW
    assert all(len(set(row[6:].tolist())) > 5 for row in cached)  # decoding is not stuck on one token
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_variant_without_cache_support_refuses_cached_generation(family: str) -> None:
    model = causal_lm(family, "reformer", OPTIONS["reformer"])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"'reformer' cannot attend over a KV cache.*use_cache=False"):
            model.generate(**prompt(6), **kw, use_cache=True)
        assert model.generate(**prompt(6), **kw, use_cache=False).shape == (2, 10)


def test_a_static_cache_is_refused() -> None:
    model = causal_lm("llama", "sliding_window", {"window": WINDOW})
    with torch.no_grad(), pytest.raises(NotImplementedError, match=r"static.*dynamic cache"):
        model.generate(
            **prompt(6), max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static"
        )
