"""Trainable-parameter counts on a BERT-base-shaped model equal the published library anchors
(AdapterHub ``adapters`` 1.3.0 / HF ``peft`` 0.21.2; DESIGN.md section 9). Built on the meta device."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

import lightning_peft as lp

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
