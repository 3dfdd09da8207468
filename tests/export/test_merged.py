"""Merged export: a plain model that transformers loads without this package, with equal outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel

import lightning_peft as lp
from lightning_peft.export import export_merged
from lightning_peft.tuners.lora import LoRALinear
from tests.models import first_output, model_inputs, perturb_trainable, tiny_model


def _out(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return first_output(model, model_inputs(family))


@pytest.mark.parametrize(
    ("family", "dtype"), [("bert", torch.float32), ("gpt2", torch.float32), ("bert", torch.bfloat16)]
)
def test_merged_export_loads_with_plain_transformers(tmp_path: Path, family: str, dtype: torch.dtype) -> None:
    model = tiny_model(family).to(dtype)
    targets = {"bert": ["query", "value", "word_embeddings"], "gpt2": ["c_attn"]}[family]
    lp.inject(model, lp.LoRAConfig(r=4, alpha=8, target_modules=targets))
    perturb_trainable(model)
    expected = _out(model, family)
    assert not torch.allclose(expected, _out(tiny_model(family).to(dtype), family), atol=1e-2)

    export_merged(model, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in saved)
    assert {v.dtype for v in saved.values()} == {dtype}
    plain = AutoModel.from_pretrained(tmp_path, dtype=dtype).eval()
    assert not any("lora" in type(m).__name__.lower() for m in plain.modules())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(_out(plain, family), expected, rtol=tol, atol=tol)
    # The model passed in is untouched: adapters still there, unmerged, trainable.
    assert lp.get_config(model) is not None
    assert all(not m.merged for m in model.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(_out(model, family), expected, rtol=0, atol=0)


def test_merged_export_from_a_module_path_keeps_the_head_aside(tmp_path: Path) -> None:
    lit = nn.Module()
    lit.backbone = tiny_model("bert")
    lit.head = nn.Linear(32, 2)
    lp.inject(lit, lp.LoRAConfig(r=2, target_modules=["query"], modules_to_save=["head"]))
    perturb_trainable(lit)
    written = {p.name for p in export_merged(lit, tmp_path, module="backbone")}
    assert {"config.json", "model.safetensors", "extra_tensors.safetensors"} <= written
    assert set(load_file(tmp_path / "extra_tensors.safetensors")) == {"head.weight", "head.bias"}
    plain = AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_out(plain, "bert"), _out(lit.backbone, "bert"), rtol=1e-5, atol=1e-5)


def test_unmergeable_tuner_is_refused(tmp_path: Path) -> None:
    model = tiny_model("bert")
    lp.inject(model, lp.BottleneckConfig(style="pfeiffer"))
    with pytest.raises(ValueError, match="cannot be merged"):
        export_merged(model, tmp_path)
