"""P-tuning: equal to Hugging Face ``peft``'s ``PromptEncoder`` given the same encoder weights (MLP and LSTM,
BERT and GPT-2 incl. ``generate``); refusals."""

from __future__ import annotations

import pytest
import torch

import lightning_peft as lp
from lightning_peft.tuners.ptuning import PTuningConfig
from tests.models import model_inputs, perturb_trainable, tiny_model
from tests.tuners.test_prompt import padded_inputs, t5_inputs, tiny_gpt2_lm, tiny_t5_lm

peft = pytest.importorskip("peft")


def _twin(model: torch.nn.Module, task: str, ours: torch.nn.Module, config: PTuningConfig) -> torch.nn.Module:
    cfg = peft.PromptEncoderConfig(
        task_type=task,
        num_transformer_submodules=1,  # seq2seq: n tokens through the encoder, as ours (peft's default is 2n)
        num_virtual_tokens=config.num_virtual_tokens,
        encoder_reparameterization_type=config.encoder.upper(),
        encoder_hidden_size=config.encoder_hidden_size,
        encoder_num_layers=config.encoder_num_layers,
    )
    twin = peft.get_peft_model(model, cfg)
    state = {k.split("prompt_encoder.", 1)[1]: v for k, v in lp.trainable_state_dict(ours).items()}
    twin.prompt_encoder["default"].load_state_dict(state, strict=True)  # same names, same shapes
    return twin.eval()


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_bert_equals_peft(encoder: str) -> None:
    config = PTuningConfig(num_virtual_tokens=3, encoder=encoder, encoder_hidden_size=8)
    ours = tiny_model("bert")
    lp.inject(ours, config)
    theirs = _twin(tiny_model("bert"), "FEATURE_EXTRACTION", ours, config)
    inputs = padded_inputs("bert")
    out = ours(**inputs).last_hidden_state
    assert out.shape == (2, 3 + 7, 32)
    torch.testing.assert_close(out, theirs(**inputs).last_hidden_state, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_gpt2_logits_and_generate_equal_peft(encoder: str) -> None:
    config = PTuningConfig(num_virtual_tokens=2, encoder=encoder, encoder_hidden_size=16)
    ours = tiny_gpt2_lm()
    lp.inject(ours, config)
    perturb_trainable(ours, scale=0.3)
    theirs = _twin(tiny_gpt2_lm(), "CAUSAL_LM", ours, config)
    inputs = model_inputs("gpt2", batch=2, length=5)
    a, b = ours(**inputs, labels=inputs["input_ids"]), theirs(**inputs, labels=inputs["input_ids"])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(**inputs, **kw), theirs.generate(**inputs, **kw))


def test_t5_logits_loss_and_generate_equal_peft() -> None:
    config = PTuningConfig(num_virtual_tokens=2, encoder="lstm", encoder_hidden_size=16)
    ours = tiny_t5_lm()
    lp.inject(ours, config)
    perturb_trainable(ours, scale=0.5)
    theirs = _twin(tiny_t5_lm(), "SEQ_2_SEQ_LM", ours, config)
    inputs = t5_inputs()
    a, b = ours(**inputs), theirs(**inputs)
    assert a.encoder_last_hidden_state.shape == (2, 2 + 7, 32)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-6)
    del inputs["labels"]
    kw = dict(max_new_tokens=6, do_sample=False)
    generated = ours.generate(**inputs, **kw)
    assert torch.equal(generated, theirs.generate(**inputs, **kw))
    assert not torch.equal(generated, tiny_t5_lm().generate(**inputs, **kw))


def test_encoder_couples_the_tokens_and_trains() -> None:
    model = tiny_model("bert")
    lp.inject(model, PTuningConfig(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=8))
    assert lp.param_summary(model).trainable == sum(p.numel() for p in model.prompt_encoder.parameters())
    model.prompt_encoder().sum().backward()
    assert all(p.grad is not None for p in model.prompt_encoder.parameters())


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"num_virtual_tokens must be > 0"):
        PTuningConfig(num_virtual_tokens=-1)
    with pytest.raises(ValueError, match="encoder="):
        PTuningConfig(encoder="gru")
    with pytest.raises(ValueError, match="encoder='lstm' only"):
        PTuningConfig(encoder="mlp", encoder_num_layers=3)
    with pytest.raises(ValueError, match="layers must be None"):
        PTuningConfig(layers=[0])
