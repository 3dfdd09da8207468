"""Hugging Face PEFT layout both ways, with the real ``peft`` package as the oracle."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification

import lightning_peft as lp
from lightning_peft.export import export_peft, import_peft
from tests.models import TINY_CONFIGS, VOCAB, first_output, model_inputs, perturb_trainable, tiny_model

peft = pytest.importorskip("peft")

TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn", "c_fc"]}


def _classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = AutoConfig.for_model("bert", vocab_size=VOCAB, num_labels=3, **TINY_CONFIGS["bert"])
    return AutoModelForSequenceClassification.from_config(config).eval()


def _logits(model: nn.Module, family: str = "bert") -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(family)).logits


def _hidden(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return first_output(model, model_inputs(family))


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_loads_our_export_with_equal_outputs(tmp_path: Path, family: str, use_rslora: bool) -> None:
    ours = tiny_model(family)
    lp.inject(ours, lp.LoRAConfig(r=4, alpha=12, target_modules=TARGETS[family], use_rslora=use_rslora))
    perturb_trainable(ours)
    export_peft(ours, tmp_path, base_model_name_or_path="unused-because-a-base-object-is-passed")

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 12
    assert config["target_modules"] == TARGETS[family] and config["fan_in_fan_out"] is (family == "gpt2")
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.{k}" for k in lp.trainable_state_dict(ours)}

    theirs = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path).eval()
    base = _hidden(tiny_model(family), family)
    expected = _hidden(ours, family)
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapters do change the outputs
    torch.testing.assert_close(_hidden(theirs, family), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_we_load_an_adapter_saved_by_peft(tmp_path: Path, family: str) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS[family])
    theirs = peft.get_peft_model(tiny_model(family), config)
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)

    ours = tiny_model(family)
    loaded = import_peft(ours, tmp_path)
    assert isinstance(loaded, lp.LoRAConfig)
    assert (loaded.r, loaded.alpha, loaded.dropout) == (4, 8.0, 0.1)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(_hidden(ours, family), _hidden(theirs, family), rtol=0, atol=1e-5)


def test_embedding_lora_and_modules_to_save_round_trip(tmp_path: Path) -> None:
    """A task model: LoRA on the word embeddings and query, the classifier trained fully."""
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "word_embeddings"], modules_to_save=["classifier"]
    )
    theirs = peft.get_peft_model(_classifier(), config)
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = _classifier()
    import_peft(ours, tmp_path / "theirs")
    assert lp.get_config(ours).modules_to_save == ["classifier"]
    expected = _logits(theirs.eval())
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=1e-5)

    # ... and back: our export of the imported model is what peft saved, and peft loads it.
    export_peft(ours, tmp_path / "ours")
    a = load_file(tmp_path / "theirs/adapter_model.safetensors")
    b = load_file(tmp_path / "ours/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    again = peft.PeftModel.from_pretrained(_classifier(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(again), expected, rtol=0, atol=1e-5)


def test_layers_and_regex_targets_export_explicit_names(tmp_path: Path) -> None:
    ours = tiny_model("bert")
    lp.inject(ours, lp.LoRAConfig(r=2, target_modules=r".*attention\.self\.(query|key)", layers=[1]))
    perturb_trainable(ours)
    export_peft(ours, tmp_path)
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert targets == ["encoder.layer.1.attention.self.key", "encoder.layer.1.attention.self.query"]
    theirs = peft.PeftModel.from_pretrained(tiny_model("bert"), tmp_path).eval()
    torch.testing.assert_close(_hidden(theirs, "bert"), _hidden(ours, "bert"), rtol=0, atol=1e-5)


class _LitLike(nn.Module):
    """What a LightningModule looks like to the export: a backbone and a head of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = tiny_model("bert")
        self.head = nn.Linear(32, 2)


def test_module_path_strips_the_prefix_and_keeps_the_head_aside(tmp_path: Path) -> None:
    lit = _LitLike()
    lp.inject(lit, lp.LoRAConfig(r=2, target_modules=["query", "value"], modules_to_save=["head"]))
    perturb_trainable(lit)
    written = export_peft(lit, tmp_path, module="backbone")
    assert {p.name for p in written} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "extra_tensors.safetensors",
    }
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.encoder.") for k in keys)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] is None
    extras = load_file(tmp_path / "extra_tensors.safetensors")
    assert set(extras) == {"head.weight", "head.bias"}
    assert torch.equal(extras["head.weight"], lit.head.weight)
    theirs = peft.PeftModel.from_pretrained(tiny_model("bert"), tmp_path).eval()
    torch.testing.assert_close(_hidden(theirs, "bert"), _hidden(lit.backbone, "bert"), rtol=0, atol=1e-5)


def _peft_folder(tmp_path: Path, **fields) -> Path:
    model = peft.get_peft_model(tiny_model("bert"), peft.LoraConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return tmp_path


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"use_dora": True}, "use_dora=True"),
        ({"bias": "all"}, "trained biases"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
        ({"rank_pattern": {"query": 8}}, "rank_pattern"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' cannot be imported"),
    ],
)
def test_unsupported_options_are_refused(tmp_path: Path, fields: dict, message: str) -> None:
    folder = _peft_folder(tmp_path, **fields)
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=message):
        import_peft(model, folder)
    assert lp.get_config(model) is None


def test_mismatched_weights_leave_the_model_untouched(tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path, target_modules=["query", "value"])  # the weights hold query only
    model = tiny_model("bert")
    reference = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"missing from the saved weights .*value\.lora_A"):
        import_peft(model, folder)
    assert lp.get_config(model) is None
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_non_lora_tuner_export_is_refused(tmp_path: Path) -> None:
    model = tiny_model("bert")
    lp.inject(model, lp.BottleneckConfig(style="pfeiffer"))
    with pytest.raises(ValueError, match=r"'bottleneck' tuner has no Hugging Face PEFT equivalent"):
        export_peft(model, tmp_path)
