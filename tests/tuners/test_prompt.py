"""Prompt tuning: numerically equal to Hugging Face ``peft`` given the same prompt tensor (BERT encoder,
GPT-2 decoder incl. loss and ``generate``), text initialisation, and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, BertTokenizer, GPT2LMHeadModel, T5ForConditionalGeneration

import lightning_peft as lp
from lightning_peft.tuners.prompt import PromptTuningConfig
from tests.models import TINY_CONFIGS, VOCAB, model_inputs, tiny_model

peft = pytest.importorskip("peft")


def tiny_gpt2_lm(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(AutoConfig.for_model("gpt2", vocab_size=VOCAB, **TINY_CONFIGS["gpt2"])).eval()


def tiny_t5_lm(seed: int = 0) -> T5ForConditionalGeneration:
    """Weights scaled up so that greedy generation is not one token repeated (a prompt then shows)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model("t5", vocab_size=VOCAB, **TINY_CONFIGS["t5"])
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    return model


def t5_inputs() -> dict[str, torch.Tensor]:
    """Encoder inputs (second row right-padded) and decoder labels."""
    inputs = padded_inputs("t5")
    inputs["labels"] = inputs.pop("decoder_input_ids").contiguous()
    return inputs


def padded_inputs(family: str) -> dict[str, torch.Tensor]:
    inputs = model_inputs(family, batch=2, length=7)
    inputs["attention_mask"][1, 5:] = 0  # right padding in the second row
    return inputs


def peft_twin(model: torch.nn.Module, task: str, n: int, prompt: torch.Tensor) -> torch.nn.Module:
    cfg = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=n)
    twin = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        twin.prompt_encoder["default"].embedding.weight.copy_(prompt)
    return twin.eval()


def test_bert_equals_peft_prompt_tuning() -> None:
    ours = tiny_model("bert")
    lp.inject(ours, PromptTuningConfig(num_virtual_tokens=4))
    prompt = ours.prompt_encoder.embedding.weight.detach()
    theirs = peft_twin(tiny_model("bert"), "FEATURE_EXTRACTION", 4, prompt)
    inputs = padded_inputs("bert")
    out = ours(**inputs).last_hidden_state
    assert out.shape == (2, 4 + 7, 32)
    torch.testing.assert_close(out, theirs(**inputs).last_hidden_state, rtol=1e-6, atol=1e-6)


def test_gpt2_loss_logits_and_generate_equal_peft() -> None:
    ours = tiny_gpt2_lm()
    lp.inject(ours, PromptTuningConfig(num_virtual_tokens=3))
    with torch.no_grad():
        ours.prompt_encoder.embedding.weight.mul_(0.5)
    prompt = ours.prompt_encoder.embedding.weight.detach()
    theirs = peft_twin(tiny_gpt2_lm(), "CAUSAL_LM", 3, prompt)
    inputs = model_inputs("gpt2", batch=2, length=6)
    a, b = ours(**inputs, labels=inputs["input_ids"]), theirs(**inputs, labels=inputs["input_ids"])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    generated = ours.generate(**inputs, **kw)
    assert generated.shape == (2, 6 + 6)
    assert torch.equal(generated, theirs.generate(**inputs, **kw))
    # With the prompt switched off, generation is the base model's.
    with lp.disable_adapters(ours):
        assert torch.equal(ours.generate(**inputs, **kw), tiny_gpt2_lm().generate(**inputs, **kw))


def test_labels_positions_and_token_types_are_shifted() -> None:
    model = tiny_gpt2_lm()
    lp.inject(model, PromptTuningConfig(num_virtual_tokens=2))
    seen: dict[str, torch.Tensor] = {}
    model.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.update({k: v for k, v in kw.items() if torch.is_tensor(v)}), with_kwargs=True
    )
    ids = torch.tensor([[5, 6, 7]])
    out = model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2]]), labels=ids)
    assert seen["position_ids"].tolist() == [[0, 1, 2, 3, 4]]
    assert seen["inputs_embeds"].shape == (1, 5, 32)
    # Loss only over real tokens (the virtual ones are -100): the last virtual position predicts the first.
    logits = out.logits[:, 1:-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    bert = tiny_model("bert")
    lp.inject(bert, PromptTuningConfig(num_virtual_tokens=2))
    inputs = model_inputs("bert")
    with_types = bert(**inputs, token_type_ids=torch.zeros_like(inputs["input_ids"])).last_hidden_state
    torch.testing.assert_close(with_types, bert(**inputs).last_hidden_state, rtol=0, atol=0)


def _tokenizer(tmp_path: Path) -> BertTokenizer:
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "classify", "the", "sentiment"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(tmp_path / "vocab.txt"))
    tok.save_pretrained(str(tmp_path / "tok"))
    return tok


@pytest.mark.parametrize("n", [3, 8])
def test_text_init_repeats_or_cuts_and_equals_peft(tmp_path: Path, n: int) -> None:
    tok = _tokenizer(tmp_path)
    text = "classify the sentiment"  # [CLS] classify the sentiment [SEP] = ids 2 5 6 7 3
    model = tiny_model("bert")
    lp.inject(model, PromptTuningConfig(num_virtual_tokens=n, init="text", init_text=text, tokenizer=tok))
    ids = ([2, 5, 6, 7, 3] * 2)[:n]
    word = model.embeddings.word_embeddings.weight
    torch.testing.assert_close(model.prompt_encoder.embedding.weight, word[ids], rtol=0, atol=0)
    cfg = peft.PromptTuningConfig(
        task_type="FEATURE_EXTRACTION",
        num_virtual_tokens=n,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path / "tok"),
    )
    theirs = peft.get_peft_model(tiny_model("bert"), cfg)
    torch.testing.assert_close(
        theirs.prompt_encoder["default"].embedding.weight, model.prompt_encoder.embedding.weight
    )
    # A local tokenizer path works the same as the object.
    by_path = tiny_model("bert")
    lp.inject(
        by_path,
        PromptTuningConfig(
            num_virtual_tokens=n, init="text", init_text=text, tokenizer=str(tmp_path / "tok")
        ),
    )
    assert torch.equal(by_path.prompt_encoder.embedding.weight, model.prompt_encoder.embedding.weight)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"num_virtual_tokens must be > 0"):
        PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PromptTuningConfig(init="text", init_text="hello")
    with pytest.raises(ValueError, match="needs init_text"):
        PromptTuningConfig(init="text", tokenizer="x")
    with pytest.raises(ValueError, match="target_modules must be None"):
        PromptTuningConfig(target_modules=["query"])
    with pytest.raises(ValueError, match="Hugging Face transformer"):
        lp.inject(torch.nn.Linear(2, 2), PromptTuningConfig())


def test_t5_forward_loss_and_generate_equal_peft() -> None:
    """Virtual tokens reach T5's encoder also in generate(), which runs the encoder directly; the decoder
    and the labels are untouched (peft's SEQ_2_SEQ_LM prompt tuning; its second n rows are unused)."""
    ours = tiny_t5_lm()
    lp.inject(ours, PromptTuningConfig(num_virtual_tokens=3))
    with torch.no_grad():
        ours.prompt_encoder.embedding.weight.mul_(5.0)
    theirs = peft.get_peft_model(
        tiny_t5_lm(), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    )
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight[:3].copy_(ours.prompt_encoder.embedding.weight)
    theirs.eval()
    inputs = t5_inputs()
    a, b = ours(**inputs), theirs(**inputs)
    assert a.logits.shape == (2, 4, VOCAB) and a.encoder_last_hidden_state.shape == (2, 3 + 7, 32)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    # The padded encoder position is masked for the decoder's cross-attention too.
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["input_ids"][1, 6] = 50
    torch.testing.assert_close(ours(**changed).logits, a.logits, rtol=0, atol=0)
    del inputs["labels"]
    kw = dict(max_new_tokens=6, do_sample=False)
    generated = ours.generate(**inputs, **kw)
    assert torch.equal(generated, theirs.generate(**inputs, **kw))
    base = tiny_t5_lm().generate(**inputs, **kw)
    assert not torch.equal(generated, base)
    with lp.disable_adapters(ours):
        assert torch.equal(ours.generate(**inputs, **kw), base)
