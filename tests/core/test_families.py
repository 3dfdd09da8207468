"""Per-family placement of bottleneck adapters and BitFit groups, on tiny models of every family."""

from __future__ import annotations

import pytest
import torch

import lightning_peft as lp
from lightning_peft.tuners.bottleneck import AdapterAfter
from tests.models import first_output, model_inputs, perturb_trainable, tiny_model

FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "llama", "t5"]
BLOCKS = {"bert": 2, "roberta": 2, "distilbert": 2, "gpt2": 2, "llama": 2, "t5": 4}  # t5: encoder + decoder


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("style", ["houlsby", "pfeiffer"])
def test_bottleneck_placement(family: str, style: str) -> None:
    model = tiny_model(family)
    inputs = model_inputs(family)
    expected = first_output(model, inputs)
    names = lp.inject(model, lp.BottleneckConfig(style=style, reduction_factor=4))
    per_block = 2 if style == "houlsby" else 1
    assert len(names) == BLOCKS[family] * per_block
    assert all(isinstance(model.get_submodule(n), AdapterAfter) for n in names)
    # Frozen parameters can route T5 through other kernels: equal up to float rounding.
    torch.testing.assert_close(first_output(model, inputs), expected, rtol=0, atol=1e-6)
    perturb_trainable(model)
    assert not torch.allclose(first_output(model, inputs), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_houlsby_layer_norms_train_when_asked(family: str) -> None:
    model = tiny_model(family)
    lp.inject(model, lp.BottleneckConfig(style="houlsby", train_layer_norms=True))
    trainable = list(lp.trainable_state_dict(model))
    assert any("norm" in k.lower() or "ln_" in k for k in trainable)


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_bitfit_groups(family: str) -> None:
    full = tiny_model(family)
    if family == "t5":  # T5 has no bias terms at all: BitFit must say so, not train nothing
        with pytest.raises(ValueError, match="no bias parameter"):
            lp.inject(full, lp.BitFitConfig(biases="all"))
        return
    lp.inject(full, lp.BitFitConfig(biases="all"))
    attention = tiny_model(family)
    lp.inject(attention, lp.BitFitConfig(biases="attention"))
    norms = tiny_model(family)
    lp.inject(norms, lp.BitFitConfig(biases="layernorm"))
    a, n, f = (set(lp.trainable_state_dict(m)) for m in (attention, norms, full))
    assert a and n and a.isdisjoint(n) and a | n < f
    assert all(k.endswith(".bias") for k in f)
