"""Prefix tuning: equal to Hugging Face ``peft`` given the same prefix tensors (BERT, GPT-2 + ``generate``),
folding, BERT-base counts, KV-cache generation on GPT-2/Llama, swapped attention variants, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, BertConfig, BertModel, LlamaForCausalLM

import lightning_peft as lp
from lightning_peft.attention import swap_attention
from lightning_peft.tuners.prefix import PrefixTuningConfig, fold_prefix
from tests.models import (
    TINY_CONFIGS,
    VOCAB,
    first_output,
    model_inputs,
    needs_interface,
    perturb_trainable,
    routes_through_interface,
    tiny_model,
    unregistered_model,
)
from tests.tuners.test_prompt import padded_inputs, tiny_gpt2_lm

peft = pytest.importorskip("peft")


def tiny_llama_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(AutoConfig.for_model("llama", vocab_size=VOCAB, **TINY_CONFIGS["llama"])).eval()


def _peft_twin(model: torch.nn.Module, task: str, ours: torch.nn.Module, **kw) -> torch.nn.Module:
    twin = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type=task, **kw))
    state = {k.split("prompt_encoder.", 1)[1]: v for k, v in lp.trainable_state_dict(ours).items()}
    twin.prompt_encoder["default"].load_state_dict(state, strict=True)  # same names and layout
    return twin.eval()


@needs_interface("bert")
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "mlp"])
def test_bert_equals_peft(projection: bool) -> None:
    config = PrefixTuningConfig(num_virtual_tokens=3, projection=projection, encoder_hidden_size=16)
    ours = tiny_model("bert")
    lp.inject(ours, config)
    perturb_trainable(ours, scale=0.5)
    kw = dict(num_virtual_tokens=3, prefix_projection=projection, encoder_hidden_size=16)
    theirs = _peft_twin(tiny_model("bert"), "FEATURE_EXTRACTION", ours, **kw)
    inputs = padded_inputs("bert")
    out = ours(**inputs).last_hidden_state
    assert out.shape == (2, 7, 32)  # prefixes are keys, not positions
    torch.testing.assert_close(out, theirs(**inputs).last_hidden_state, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, tiny_model("bert")(**inputs).last_hidden_state)


def test_gpt2_logits_loss_and_generate_equal_peft() -> None:
    ours = tiny_gpt2_lm()
    lp.inject(ours, PrefixTuningConfig(num_virtual_tokens=4))
    theirs = _peft_twin(tiny_gpt2_lm(), "CAUSAL_LM", ours, num_virtual_tokens=4)
    inputs = padded_inputs("gpt2")
    a, b = ours(**inputs, labels=inputs["input_ids"]), theirs(**inputs, labels=inputs["input_ids"])
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(a.logits[real], b.logits[real], rtol=1e-5, atol=1e-5)
    inputs = model_inputs("gpt2", batch=2, length=5)
    a, b = ours(**inputs, labels=inputs["input_ids"]), theirs(**inputs, labels=inputs["input_ids"])
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    generated = ours.generate(**inputs, **kw)
    assert torch.equal(generated, theirs.generate(**inputs, **kw))
    assert not torch.equal(generated, tiny_gpt2_lm().generate(**inputs, **kw))


@pytest.mark.parametrize("make", [tiny_gpt2_lm, tiny_llama_lm], ids=["gpt2", "llama"])
def test_generate_with_kv_cache_equals_full_recompute(make) -> None:
    model = make()
    lp.inject(model, PrefixTuningConfig(num_virtual_tokens=3, projection=True, encoder_hidden_size=8))
    perturb_trainable(model, scale=0.5)
    inputs = model_inputs("gpt2", batch=2, length=4)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    cached = model.generate(**inputs, **kw, use_cache=True)
    assert torch.equal(cached, model.generate(**inputs, **kw, use_cache=False))
    # Last-step logits from the cached path equal a full forward over the generated sequence.
    full = model(input_ids=cached).logits[:, -2]
    step = model.generate(**inputs, **kw, output_logits=True, return_dict_in_generate=True).logits[-1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_shift_positions_off_keeps_positions() -> None:
    model = tiny_gpt2_lm()
    lp.inject(model, PrefixTuningConfig(num_virtual_tokens=2, shift_positions=False))
    seen: dict = {}
    model.transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    model(input_ids=torch.tensor([[4, 5, 6]]))
    assert seen.get("position_ids") is None
    shifted = tiny_gpt2_lm()
    lp.inject(shifted, PrefixTuningConfig(num_virtual_tokens=2))
    shifted.transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    shifted(torch.tensor([[4, 5, 6]]))  # positional input_ids too
    assert seen["position_ids"].tolist() == [[2, 3, 4]]


@needs_interface("bert")
def test_fold_leaves_outputs_unchanged_and_loads_as_plain_prefix() -> None:
    model = tiny_model("bert")
    lp.inject(model, PrefixTuningConfig(num_virtual_tokens=3, projection=True, encoder_hidden_size=8))
    perturb_trainable(model, scale=0.5)
    inputs = padded_inputs("bert")
    before = first_output(model, inputs)
    trained = lp.param_summary(model).trainable
    fold_prefix(model)
    torch.testing.assert_close(first_output(model, inputs), before, rtol=1e-6, atol=1e-6)
    assert lp.param_summary(model).trainable == 3 * 2 * 2 * 32 < trained
    plain = tiny_model("bert")
    lp.inject(plain, PrefixTuningConfig(num_virtual_tokens=3))
    lp.load_trainable_state_dict(plain, lp.trainable_state_dict(model))
    torch.testing.assert_close(first_output(plain, inputs), before, rtol=1e-6, atol=1e-6)


@needs_interface("bert")
def test_bert_base_counts_training_and_folded() -> None:
    with torch.device("meta"):
        model = BertModel(BertConfig())
    lp.inject(model, PrefixTuningConfig(num_virtual_tokens=30, projection=True, encoder_hidden_size=512))
    assert lp.param_summary(model).trainable == 9_872_384
    fold_prefix(model)
    assert lp.param_summary(model).trainable == 552_960


@needs_interface("bert")
def test_swapped_variant_takes_prefix_keys_as_num_prefix() -> None:
    reference = tiny_model("bert")
    lp.inject(reference, PrefixTuningConfig(num_virtual_tokens=3))
    perturb_trainable(reference, scale=0.5)
    model = tiny_model("bert")
    swap_attention(model, "sliding_window", window=64)  # window >= n: equals dense attention
    lp.inject(model, PrefixTuningConfig(num_virtual_tokens=3))
    lp.load_trainable_state_dict(model, lp.trainable_state_dict(reference))
    inputs = padded_inputs("bert")
    torch.testing.assert_close(
        first_output(model, inputs), first_output(reference, inputs), rtol=1e-5, atol=1e-5
    )
    calls: list[int] = []
    variant = model.encoder.layer[0].attention.self.attention_variant
    variant.register_forward_hook(lambda _m, _a, kw, _o: calls.append(kw["num_prefix"]), with_kwargs=True)
    model(**inputs)
    assert calls == [3]


@pytest.mark.parametrize("make", [tiny_gpt2_lm, tiny_llama_lm], ids=["gpt2", "llama"])
def test_windowed_variant_with_prefix_and_kv_cache_equals_the_full_forward(make) -> None:
    """Prefix keys and cached keys reach a swapped variant apart: with window 8 and 20 tokens a cached
    step must not let the new token see cached keys outside its window (the prefix keys it sees always)."""
    model = make().double()
    swap_attention(model, "sliding_window", window=8)
    lp.inject(model, PrefixTuningConfig(num_virtual_tokens=3))
    perturb_trainable(model, scale=0.5)
    inputs = model_inputs("gpt2", batch=2, length=20)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    mask[0, :3] = 0  # left padding in the first row
    calls: list[tuple[int, int]] = []
    variant = next(m.attention_variant for m in model.modules() if "attention_variant" in m._modules)
    variant.register_forward_hook(
        lambda _m, _a, kw, _o: calls.append((kw["num_prefix"], kw.get("num_cached", 0))), with_kwargs=True
    )
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits  # (B, 20, V)
        for cut in (19, 12):
            head = model(input_ids=ids[:, :cut], attention_mask=mask[:, :cut], use_cache=True)
            step = model(input_ids=ids[:, cut:], attention_mask=mask, past_key_values=head.past_key_values)
            torch.testing.assert_close(step.logits, full[:, cut:], rtol=1e-9, atol=1e-9)
    assert calls == [(3, 0), (3, 0), (3, 19), (3, 0), (3, 12)]


@needs_interface("bert")
def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"num_virtual_tokens must be > 0"):
        PrefixTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match=r"num_virtual_tokens must be > 0"):
        PrefixTuningConfig(num_virtual_tokens=-2)
    with pytest.raises(ValueError, match=r"no registered layout.*register_layout"):
        lp.inject(unregistered_model(), PrefixTuningConfig())
    with pytest.raises(ValueError, match="sites applies to encoder-decoder models"):
        lp.inject(tiny_model("gpt2"), PrefixTuningConfig(sites=["decoder_self"]))
    linformer = tiny_model("bert")
    swap_attention(linformer, "linformer", proj_dim=4)
    with pytest.raises(ValueError, match=r"'linformer'.*cannot take prefix keys"):
        lp.inject(linformer, PrefixTuningConfig())
    late = tiny_model("bert")
    lp.inject(late, PrefixTuningConfig(num_virtual_tokens=2))
    swap_attention(late, "sdpa")
    with pytest.raises(RuntimeError, match="swap the attention first"):
        late(**model_inputs("bert"))


@pytest.mark.skipif(routes_through_interface("bert"), reason="this transformers' BERT takes prefix keys")
def test_inline_attention_is_refused_clearly() -> None:  # pragma: no cover - run by make test-compat
    with pytest.raises(ValueError, match="does not run through AttentionInterface"):
        lp.inject(tiny_model("bert"), PrefixTuningConfig())
