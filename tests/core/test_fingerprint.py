"""The base-model fingerprint: same base passes, another base (shape or values) is named, tuner state is
no part of it."""

from __future__ import annotations

import pytest
import torch

import lightning_peft as lp
from lightning_peft.fingerprint import base_fingerprint, check_base, compare_fingerprints
from tests.models import tiny_model


def test_same_base_agrees_and_tuner_tensors_are_left_out() -> None:
    before = base_fingerprint(tiny_model("bert"))
    model = tiny_model("bert")
    lp.inject(model, lp.LoRAConfig())
    after = base_fingerprint(model)
    assert not any("lora" in k for k in after)
    assert compare_fingerprints(before, after) == []


def test_other_weights_and_other_shapes_are_named() -> None:
    base = base_fingerprint(tiny_model("bert", seed=0))
    problems = compare_fingerprints(base, base_fingerprint(tiny_model("bert", seed=1)))
    assert len(problems) == 1 and "different values" in problems[0] and "word_embeddings" in problems[0]
    other = tiny_model("bert")
    with torch.no_grad():
        other.embeddings.word_embeddings.weight.add_(1.0)
    with pytest.raises(ValueError, match=r"different base model[\s\S]*word_embeddings"):
        check_base(other, {"fingerprint": base}, where="these adapters")
    check_base(tiny_model("bert"), {"fingerprint": base}, where="these adapters")  # the same base passes
    check_base(other, {}, where="no fingerprint stored: nothing to check")
