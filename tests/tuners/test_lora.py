"""LoRA against the Hugging Face ``peft`` oracle, plus LoRA-specific behaviour."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.tuners.lora import LoRAEmbedding, LoRALinear
from tests.models import first_output, model_inputs, perturb_trainable, tiny_model

peft = pytest.importorskip("peft")


def _peft_model(base: nn.Module, **kw) -> nn.Module:
    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(lora_dropout=0.0, **kw)).eval()


def _copy_from_peft(ours: nn.Module, theirs: nn.Module) -> None:
    """Give our adapters the peft model's adapter tensors (renaming keys only)."""
    sd = {}
    for key, value in theirs.state_dict().items():
        if "lora_" in key:
            key = key.removeprefix("base_model.model.").replace(".default", "")
            sd[key] = value
    lp.load_trainable_state_dict(ours, sd)


@pytest.mark.parametrize(
    ("family", "targets", "extra"),
    [
        ("bert", ["query", "value"], {}),
        ("bert", ["query", "value", "dense"], {"use_rslora": True}),
        ("roberta", ["query", "key"], {}),
        ("gpt2", ["c_attn", "c_proj"], {}),  # Conv1D: (in, out) weights
        ("llama", ["q_proj", "v_proj", "down_proj"], {}),
        ("bert", ["word_embeddings", "query"], {}),  # Embedding LoRA
    ],
)
def test_lora_matches_peft(family: str, targets: list[str], extra: dict) -> None:
    base = tiny_model(family)
    r, alpha = 4, 12
    theirs = _peft_model(
        base, r=r, lora_alpha=alpha, target_modules=targets, fan_in_fan_out=family == "gpt2", **extra
    )
    perturb_trainable(theirs, scale=0.2)  # B is zero at init: make the comparison meaningful
    ours = copy.deepcopy(base)
    lp.inject(ours, lp.LoRAConfig(r=r, alpha=alpha, target_modules=targets, **extra))
    _copy_from_peft(ours, theirs)
    inputs = model_inputs(family)
    expected = first_output(theirs, inputs)
    assert not torch.allclose(expected, first_output(base, inputs), atol=1e-4)
    torch.testing.assert_close(first_output(ours, inputs), expected, rtol=1e-5, atol=1e-5)
    assert lp.param_summary(ours).trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def test_scaling_and_rslora() -> None:
    assert lp.LoRAConfig(r=8, alpha=16).scaling == 2.0
    assert lp.LoRAConfig(r=16, alpha=16, use_rslora=True).scaling == pytest.approx(16 / math.sqrt(16))


def test_conv1d_fan_in_fan_out_is_automatic() -> None:
    model = tiny_model("gpt2")
    lp.inject(model, lp.LoRAConfig(r=2, target_modules=["c_attn"]))
    layer = model.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.fan_in_fan_out
    assert layer.lora_A.weight.shape == (2, 32) and layer.lora_B.weight.shape == (96, 2)
    assert layer.delta_weight().shape == layer.base_layer.weight.shape == (32, 96)


def test_embedding_lora_merges_exactly() -> None:
    model = tiny_model("bert")
    lp.inject(model, lp.LoRAConfig(r=3, target_modules=["word_embeddings"]))
    assert isinstance(model.embeddings.word_embeddings, LoRAEmbedding)
    perturb_trainable(model)
    inputs = model_inputs("bert")
    before = first_output(model, inputs)
    lp.merge(model)
    torch.testing.assert_close(first_output(model, inputs), before, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training() -> None:
    model = tiny_model("bert")
    lp.inject(model, lp.LoRAConfig(r=4, dropout=0.5, target_modules=["query"]))
    perturb_trainable(model)
    layer = model.encoder.layer[0].attention.self.query
    x = torch.randn(3, 32)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


def test_modules_to_save_trains_the_head() -> None:
    model = nn.ModuleDict({"backbone": tiny_model("bert"), "classifier": nn.Linear(32, 3)})
    lp.inject(model, lp.LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    keys = set(lp.trainable_state_dict(model))
    assert {"classifier.weight", "classifier.bias"} <= keys
    assert all("lora_" in k or k.startswith("classifier.") for k in keys)


def test_bf16_base_keeps_its_dtype_after_merge() -> None:
    model = tiny_model("bert").to(torch.bfloat16)
    lp.inject(model, lp.LoRAConfig(r=2, target_modules=["query"]))
    perturb_trainable(model)
    lp.merge(model)
    assert model.encoder.layer[0].attention.self.query.base_layer.weight.dtype == torch.bfloat16
