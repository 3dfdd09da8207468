"""Trainable-parameter counts on a BERT-base-shaped model equal the library anchors: AdapterHub ``adapters``
1.3.0 as measured by ``benchmarks/adapterhub_counts.py`` (``benchmarks/results/adapterhub_counts.json``) and
HF ``peft`` 0.21.2. Built on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

import lightning_peft as lp
from lightning_peft.tuners.compacter import CompacterConfig, CompacterPlusPlusConfig
from lightning_peft.tuners.prefix import PrefixTuningConfig
from lightning_peft.tuners.unified import UnifiedConfig
from tests.models import needs_interface

BERT_BASE_TOTAL = 109_482_240


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (lp.LoRAConfig(r=8, target_modules=["query", "value"]), 294_912),
        (lp.BottleneckConfig(style="houlsby", reduction_factor=16), 1_789_056),
        (lp.BottleneckConfig(style="pfeiffer", reduction_factor=16), 894_528),
        (lp.BitFitConfig(), 102_912),
    ],
    ids=["lora-r8-qv", "houlsby-rf16", "pfeiffer-rf16", "bitfit-all"],
)
def test_bert_base_anchor_counts(config: lp.TunerConfig, expected: int) -> None:
    with torch.device("meta"):
        model = BertModel(BertConfig())
    assert lp.param_summary(model).total == BERT_BASE_TOTAL
    lp.inject(model, config)
    summary = lp.param_summary(model)
    assert summary.trainable == expected
    assert summary.total == BERT_BASE_TOTAL + (0 if isinstance(config, lp.BitFitConfig) else expected)


def test_bottleneck_count_formula() -> None:
    d, m = 768, 48
    assert (2 * m * d + m + d) * 12 == 894_528


ADAPTERHUB = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "adapterhub_counts.json"
# The JSON's method names -> our config of the same method.
OURS = {
    "LoRA r=8 q,v": lambda: lp.LoRAConfig(r=8, target_modules=["query", "value"]),
    "Houlsby rf 16": lambda: lp.BottleneckConfig(style="houlsby", reduction_factor=16),
    "Pfeiffer rf 16": lambda: lp.BottleneckConfig(style="pfeiffer", reduction_factor=16),
    "parallel adapter rf 2": lambda: UnifiedConfig(preset="parallel"),
    "Compacter": CompacterConfig,
    "Compacter++": CompacterPlusPlusConfig,
    "prefix 30 tokens with MLP 512": lambda: PrefixTuningConfig(
        num_virtual_tokens=30, projection=True, encoder_hidden_size=512
    ),
}


@needs_interface("bert")  # prefix tuning needs attention routed through AttentionInterface
@pytest.mark.parametrize("method", list(OURS))
def test_counts_equal_adapterhub_measured(method: str) -> None:
    measured = json.loads(ADAPTERHUB.read_text())
    assert set(measured["trainable"]) == set(OURS), "adapterhub_counts.py and this test name other methods"
    with torch.device("meta"):
        model = BertModel(BertConfig())
    lp.inject(model, OURS[method]())
    assert lp.param_summary(model).trainable == measured["trainable"][method]
