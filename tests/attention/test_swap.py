"""swap_attention on tiny Hugging Face BERT, RoBERTa, GPT-2 and Llama models built in code.

Runs on transformers 5.x (every family through AttentionInterface) and 4.57 (BERT/RoBERTa by module
replacement); see ``test_route_matches_the_transformers_version``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from lightning_peft.attention import get_attention
from lightning_peft.attention.swap import INTERFACE_KEY, key_padding_from_mask, swap_attention, swapped
from tests.models import unregistered_model

V5 = int(transformers.__version__.split(".")[0]) >= 5
FAMILIES = ["bert", "roberta", "gpt2", "llama"]
CAUSAL = {"bert": False, "roberta": False, "gpt2": True, "llama": True}


def tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    if family == "bert":
        config = BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
        return BertModel(config).eval()
    if family == "roberta":
        config = RobertaConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=40,
            num_labels=3,
        )
        return RobertaForSequenceClassification(config).eval()
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        return GPT2LMHeadModel(config).eval()
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def batch(family: str, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 64, (2, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, length, dtype=torch.long)
    if CAUSAL[family]:
        mask[0, :5] = 0  # left padding: with right padding a causal model never looks at the pads
    else:
        mask[0, length - 5 :] = 0
    return ids, mask


def output(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last hidden states ``(B, T, C)`` (a tiny random head would hide differences)."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]


def real_rows(out: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [out[i][mask[i].bool()] for i in range(out.shape[0])]


def assert_same_on_real_tokens(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> None:
    for x, y in zip(real_rows(a, mask), real_rows(b, mask), strict=True):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("variant", "options"), [("sdpa", {}), ("sliding_window", {"window": 64})])
def test_dense_limit_equals_the_unswapped_model(family: str, variant: str, options: dict) -> None:
    model = tiny(family)
    swapped_model = copy.deepcopy(model)
    report = swap_attention(swapped_model, variant, **options)
    assert report.causal is CAUSAL[family] and len(report.modules) == 2
    ids, mask = batch(family)
    assert_same_on_real_tokens(output(swapped_model, ids, mask), output(model, ids, mask), mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_route_matches_the_transformers_version(family: str) -> None:
    model = tiny(family)
    report = swap_attention(model, "sdpa")
    interface = V5 or family in ("gpt2", "llama")
    assert report.route == ("attention_interface" if interface else "module")
    if interface:
        assert model.config._attn_implementation == INTERFACE_KEY


@pytest.mark.parametrize("family", FAMILIES)
def test_variant_receives_the_compact_key_padding_mask(family: str, monkeypatch) -> None:
    model = tiny(family)
    swap_attention(model, "sdpa")
    seen: list[torch.Tensor | None] = []
    variant_cls = type(next(m for n, m in model.named_modules() if n.endswith("attention_variant")))
    original = variant_cls.attend

    def spy(self, q, k, v, **kwargs):
        seen.append(kwargs["key_padding_mask"])
        assert kwargs["causal"] is CAUSAL[family]
        return original(self, q, k, v, **kwargs)

    monkeypatch.setattr(variant_cls, "attend", spy)
    ids, mask = batch(family)
    output(model, ids, mask)
    assert len(seen) == 2
    for kpm in seen:
        assert kpm is not None and kpm.dtype == torch.bool and kpm.shape == mask.shape
        assert torch.equal(kpm, mask.bool())
    output(model, ids, torch.ones_like(mask))
    assert seen[-1] is None  # no padding: no mask at all


@pytest.mark.parametrize("family", FAMILIES)
def test_without_the_mask_function_padding_would_be_lost(family: str, monkeypatch) -> None:
    """Guards the pairing: the model passes no mask when only the attention function is registered."""
    model = tiny(family)
    reference = copy.deepcopy(model)
    report = swap_attention(model, "sdpa")
    if report.route != "attention_interface":
        pytest.skip("module replacement reads the model's own mask")
    from transformers.masking_utils import AttentionMaskInterface

    ids, mask = batch(family)
    assert_same_on_real_tokens(output(model, ids, mask), output(reference, ids, mask), mask)
    monkeypatch.delitem(AttentionMaskInterface._global_mapping, INTERFACE_KEY)
    broken = output(model, ids, mask)
    with pytest.raises(AssertionError):
        assert_same_on_real_tokens(broken, output(reference, ids, mask), mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_keys_are_kept_and_only_gain_variant_parameters(family: str) -> None:
    base = tiny(family)
    keys = set(base.state_dict())
    plain = copy.deepcopy(base)
    swap_attention(plain, "sdpa")
    assert set(plain.state_dict()) == keys
    plain.load_state_dict(base.state_dict())  # pretrained weights load strictly
    synth = copy.deepcopy(base)
    swap_attention(synth, "synthesizer", mode="random")
    extra = set(synth.state_dict()) - keys
    assert keys <= set(synth.state_dict()) and len(extra) == 2
    assert all(k.endswith("attention_variant.random_logits") for k in extra)
    missing, unexpected = synth.load_state_dict(base.state_dict(), strict=False)
    assert set(missing) == extra and not unexpected


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_models_stay_causal(family: str) -> None:
    model = tiny(family)
    swap_attention(model, "reformer", bucket_size=4, n_hashes=2)
    ids = torch.randint(3, 64, (1, 24), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[:, 16:] = torch.randint(3, 64, (1, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    a, b = output(model, ids, mask), output(model, changed, mask)
    torch.testing.assert_close(a[:, :16], b[:, :16])
    assert not torch.allclose(a[:, 16:], b[:, 16:])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("variant", ["fnet", "mixer"])
def test_causal_models_refuse_non_causal_variants(family: str, variant: str) -> None:
    with pytest.raises(ValueError, match=r"cannot do causal attention; choose one of: .*reformer"):
        swap_attention(tiny(family), variant)


def test_unknown_variant_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"Known variants: .*reformer.*synthesizer"):
        swap_attention(tiny("bert"), "reformers")


def test_unsupported_model_is_refused() -> None:
    with pytest.raises(ValueError, match="no Hugging Face transformers model"):
        swap_attention(nn.Linear(2, 2), "sdpa")
    with pytest.raises(ValueError, match=r"no registered layout.*register_layout"):
        swap_attention(unregistered_model(), "sdpa")


def test_swapping_again_is_idempotent_and_another_variant_is_refused() -> None:
    model = tiny("bert")
    first = swap_attention(model, "synthesizer", mode="random")
    params = {n: p for n, p in model.named_parameters()}
    assert swap_attention(model, "synthesizer", mode="random") is first is swapped(model)
    assert {n: p for n, p in model.named_parameters()} == params
    with pytest.raises(ValueError, match="already runs synthesizer"):
        swap_attention(model, "sdpa")


@pytest.mark.parametrize("variant", ["fnet", "mixer"])
def test_token_mixers_replace_bert_self_attention_and_train(variant: str) -> None:
    model = tiny("bert").train()
    report = swap_attention(model, variant)
    assert report.route == "module" and "encoder.layer.0.attention.self" in report.modules
    assert not any(".attention.self.query" in k for k in model.state_dict())
    ids, mask = batch("bert")
    model(input_ids=ids, attention_mask=mask)[0].pow(2).mean().backward()
    assert model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.encoder.layer[0].attention.output.dense.weight.grad.abs().sum() > 0
    if variant == "mixer":
        assert model.encoder.layer[0].attention.self.mixer.w1.grad.abs().sum() > 0


def test_fnet_bert_outputs_of_real_tokens_ignore_padding_length() -> None:
    model = tiny("bert")
    swap_attention(model, "fnet")
    ids = torch.randint(3, 64, (1, 9), generator=torch.Generator().manual_seed(4))
    alone = output(model, ids, torch.ones_like(ids))
    padded_ids = torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], 1)
    padded_mask = (torch.arange(16) < 9).long()[None]
    torch.testing.assert_close(output(model, padded_ids, padded_mask)[:, :9], alone, atol=1e-5, rtol=1e-5)


def test_parameterised_variants_train_inside_the_model() -> None:
    model = tiny("roberta").train()
    swap_attention(model, "synthesizer", mode="dense")
    ids, mask = batch("roberta")
    model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2])).loss.backward()
    variant = model.roberta.encoder.layer[1].attention.self.attention_variant
    assert variant.w2.grad is not None and variant.w2.grad.abs().sum() > 0


def test_lora_targets_still_match_after_a_swap_and_train() -> None:
    import lightning_peft

    model = tiny("bert").train()
    swap_attention(model, "sliding_window", window=4)
    lightning_peft.inject(model, lightning_peft.LoRAConfig(r=2, alpha=4, target_modules=["query", "value"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and len(trainable) < len(list(model.parameters()))
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    ids, mask = batch("bert")
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=mask)[0].pow(2).mean().backward()
        optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))


def test_key_padding_from_additive_and_boolean_masks() -> None:
    real = torch.tensor([[True, True, False], [True, True, True]])
    additive = torch.zeros(2, 1, 1, 3).masked_fill(~real[:, None, None, :], torch.finfo(torch.float32).min)
    assert torch.equal(key_padding_from_mask(additive), real)
    expanded = real[:, None, None, :].expand(2, 1, 3, 3)
    assert torch.equal(key_padding_from_mask(expanded), real)
    assert key_padding_from_mask(torch.ones(2, 3)) is None


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_generation_matches_the_unswapped_model(family: str) -> None:
    """With a KV cache the cached keys reach the variant as num_cached keys (window >= n: dense attention)."""
    model = tiny(family)
    swapped_model = copy.deepcopy(model)
    swap_attention(swapped_model, "sliding_window", window=64)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(swapped_model.generate(input_ids=ids, attention_mask=mask, **kwargs), expected)


@pytest.mark.parametrize("variant", ["linformer", "mixer"])
def test_a_given_max_length_reaches_the_variant(variant: str) -> None:
    """max_length is both swap_attention's default source (the model's position limit) and a variant
    option: a user's value is passed once (it once raised "got multiple values for keyword argument")."""
    options = {"proj_dim": 4} if variant == "linformer" else {}
    model = tiny("bert")  # max_position_embeddings=32
    report = swap_attention(model, variant, max_length=64, **options)
    assert report.options == {"max_length": 64, **options}
    cls = get_attention(variant)
    variants = [m for m in model.modules() if isinstance(m, cls)]
    assert len(variants) == 2 and all(v.max_length == 64 for v in variants)
    sequence_axis = variants[0].E.shape[-1] if variant == "linformer" else variants[0].w1.shape[1]
    assert sequence_axis == 64  # the learned sequence-axis parameters are sized by it
    default = tiny("bert")
    swap_attention(default, variant, **options)
    assert [v.max_length for v in default.modules() if isinstance(v, cls)] == [32, 32]
    ids, mask = batch("bert")
    assert output(model, ids, mask).shape == (2, 12, 16)
