"""Prompt tuning, P-tuning and prefix tuning in the Hugging Face PEFT layout, both ways, with the real
``peft`` package as the oracle (BERT encoder, GPT-2 decoder incl. ``generate``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

import lightning_peft as lp
from lightning_peft.export import export_peft, import_peft
from lightning_peft.tuners.prefix import PrefixTuningConfig
from lightning_peft.tuners.prompt import PromptTuningConfig
from lightning_peft.tuners.ptuning import PTuningConfig
from tests.models import TINY_CONFIGS, VOCAB, model_inputs, perturb_trainable, tiny_model
from tests.tuners.test_prompt import padded_inputs, t5_inputs, tiny_gpt2_lm, tiny_t5_lm

peft = pytest.importorskip("peft")

OURS: dict[str, Callable[[], lp.TunerConfig]] = {
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3),
    "ptuning-mlp": lambda: PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8),
    "ptuning-lstm": lambda: PTuningConfig(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3, projection=True, encoder_hidden_size=8),
}
THEIRS: dict[str, Callable[[str], object]] = {
    "prompt": lambda task: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=3),
    "ptuning-mlp": lambda task: peft.PromptEncoderConfig(
        task_type=task, num_virtual_tokens=3, encoder_hidden_size=8
    ),
    "ptuning-lstm": lambda task: peft.PromptEncoderConfig(
        task_type=task, num_virtual_tokens=3, encoder_reparameterization_type="LSTM", encoder_hidden_size=8
    ),
    "prefix": lambda task: peft.PrefixTuningConfig(
        task_type=task, num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8
    ),
}
PEFT_TYPE = {"prompt": "PROMPT_TUNING", "ptuning-mlp": "P_TUNING", "ptuning-lstm": "P_TUNING"}
MODELS = {"bert": (lambda: tiny_model("bert"), "FEATURE_EXTRACTION"), "gpt2": (tiny_gpt2_lm, "CAUSAL_LM")}


def _out(model: nn.Module, family: str) -> torch.Tensor:
    inputs = padded_inputs("bert") if family == "bert" else model_inputs("gpt2", batch=2, length=5)
    with torch.no_grad():
        out = model(**inputs)
    return out.last_hidden_state if family == "bert" else out.logits


def _generate(model: nn.Module) -> torch.Tensor:
    inputs = model_inputs("gpt2", batch=2, length=5)
    return model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("method", list(OURS))
def test_peft_loads_our_export_with_equal_outputs(tmp_path: Path, method: str, family: str) -> None:
    make, task = MODELS[family]
    ours = make()
    lp.inject(ours, OURS[method]())
    perturb_trainable(ours, scale=0.3)
    export_peft(ours, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPE.get(method, "PREFIX_TUNING")
    assert (config["task_type"], config["num_virtual_tokens"], config["token_dim"]) == (task, 3, 32)
    assert (config["num_layers"], config["num_attention_heads"], config["num_transformer_submodules"]) == (
        2,
        2,
        1,
    )
    table = load_file(tmp_path / "adapter_model.safetensors")
    assert set(table) == {"prompt_embeddings"}
    assert table["prompt_embeddings"].shape == ((3, 2 * 2 * 32) if method == "prefix" else (3, 32))

    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    expected = _out(ours, family)
    assert not torch.allclose(expected[:, -5:], _out(make(), family)[:, -5:], atol=1e-3)
    torch.testing.assert_close(_out(theirs, family), expected, rtol=1e-5, atol=1e-5)
    if family == "gpt2":
        assert torch.equal(_generate(theirs), _generate(ours))


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("method", list(OURS))
def test_we_load_an_adapter_saved_by_peft(tmp_path: Path, method: str, family: str) -> None:
    make, task = MODELS[family]
    theirs = peft.get_peft_model(make(), THEIRS[method](task))
    perturb_trainable(theirs, scale=0.3)
    theirs.save_pretrained(tmp_path)
    theirs.eval()

    ours = make()
    loaded = import_peft(ours, tmp_path)
    # peft stores what the model consumes: P-tuning's encoder output, prefix tuning's folded prefixes.
    expected_type = PrefixTuningConfig if method == "prefix" else PromptTuningConfig
    assert type(loaded) is expected_type and loaded.num_virtual_tokens == 3
    torch.testing.assert_close(_out(ours, family), _out(theirs, family), rtol=1e-5, atol=1e-5)
    if family == "gpt2":
        assert torch.equal(_generate(ours), _generate(theirs))
    # What we imported exports back to the very same tensor.
    export_peft(ours, tmp_path / "again")
    torch.testing.assert_close(
        load_file(tmp_path / "again" / "adapter_model.safetensors")["prompt_embeddings"],
        load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"],
        rtol=0,
        atol=0,
    )


def _classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model("bert", vocab_size=VOCAB, num_labels=3, **TINY_CONFIGS["bert"])
    return AutoModelForSequenceClassification.from_config(config).eval()


def test_classifier_head_travels_as_modules_to_save(tmp_path: Path) -> None:
    ours = _classifier()
    lp.inject(ours, PromptTuningConfig(num_virtual_tokens=4, modules_to_save=["classifier"]))
    perturb_trainable(ours, scale=0.3)
    export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["classifier"])
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}

    inputs = padded_inputs("bert")
    with torch.no_grad():
        expected = ours(**inputs).logits
        theirs = peft.PeftModel.from_pretrained(_classifier(), tmp_path).eval()
        torch.testing.assert_close(theirs(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        back = _classifier()
        import_peft(back, tmp_path)
        torch.testing.assert_close(back(**inputs).logits, expected, rtol=0, atol=0)


def test_options_peft_cannot_reproduce_are_refused(tmp_path: Path) -> None:
    unshifted = tiny_model("bert")
    lp.inject(unshifted, PrefixTuningConfig(num_virtual_tokens=2, shift_positions=False))
    with pytest.raises(ValueError, match="shift_positions=False has no peft equivalent"):
        export_peft(unshifted, tmp_path)

    model = tiny_model("bert")
    lp.inject(model, PromptTuningConfig(num_virtual_tokens=2))
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "num_transformer_submodules": 2}))
    with pytest.raises(ValueError, match="num_transformer_submodules=2 does not fit"):
        import_peft(tiny_model("bert"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "num_ranks": 4}))
    with pytest.raises(ValueError, match="num_ranks=4"):
        import_peft(tiny_model("bert"), tmp_path)
    fresh = tiny_model("bert")
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 5}))
    with pytest.raises(ValueError, match="shape mismatch"):
        import_peft(fresh, tmp_path)
    assert lp.get_config(fresh) is None  # left as it was given


@pytest.mark.parametrize("method", ["prompt", "ptuning-lstm"])
def test_t5_round_trip_both_ways(tmp_path: Path, method: str) -> None:
    """Ours -> peft with n rows (num_transformer_submodules=1); peft's default 2n rows -> ours (the first n,
    which is all peft's seq2seq prompt forward uses). Logits reach ~30 here: float32 rounding of the two
    code paths allows 1e-4."""
    inputs = t5_inputs()
    ours = tiny_t5_lm()
    lp.inject(ours, OURS[method]())
    perturb_trainable(ours, scale=0.3)
    export_peft(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["task_type"], config["num_transformer_submodules"]) == ("SEQ_2_SEQ_LM", 1)
    loaded = peft.PeftModel.from_pretrained(tiny_t5_lm(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, ours(**inputs).logits, rtol=1e-4, atol=1e-4)

    theirs = peft.get_peft_model(tiny_t5_lm(), THEIRS[method]("SEQ_2_SEQ_LM"))
    perturb_trainable(theirs, scale=0.3)
    theirs.eval()  # peft saves the encoder's output: in train mode its dropout would be in the saved rows
    theirs.save_pretrained(tmp_path / "theirs")
    assert load_file(tmp_path / "theirs" / "adapter_model.safetensors")["prompt_embeddings"].shape == (6, 32)
    back = tiny_t5_lm()
    import_peft(back, tmp_path / "theirs")
    assert back.prompt_encoder.embedding.weight.shape == (3, 32)
    with torch.no_grad():
        expected = theirs(**inputs).logits
        # float32 rounding scales with the logits' magnitude (~30): 1e-4 of it, not of each element
        atol = 1e-4 * float(expected.abs().max())
        torch.testing.assert_close(back(**inputs).logits, expected, rtol=1e-4, atol=atol)
    del inputs["labels"]
    kw = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(back.generate(**inputs, **kw), theirs.generate(**inputs, **kw))
