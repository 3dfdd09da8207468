"""Compacter / Compacter++: the PHM weight is the Kronecker sum, slow weights are shared, counts match."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

import lightning_peft as lp
from lightning_peft.tuners.compacter import (
    CompacterAdapter,
    CompacterConfig,
    CompacterPlusPlusConfig,
    PHMLinear,
    kron_sum,
)
from tests.models import first_output, model_inputs, perturb_trainable, tiny_model


@pytest.mark.parametrize("rank", [1, 2, None])
def test_phm_weight_is_the_explicit_kronecker_sum(rank: int | None) -> None:
    torch.manual_seed(0)
    layer = PHMLinear(12, 8, n=4, rank=rank)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    A = layer.phm_rule
    B = layer.fast_weights()
    if rank is not None:
        B_explicit = torch.stack([layer.s[i] @ layer.t[i] for i in range(4)])
        torch.testing.assert_close(B, B_explicit)
        assert torch.linalg.matrix_rank(B[0]).item() == rank
    expected = sum(torch.kron(A[i], B[i]) for i in range(4))
    assert expected.shape == (12, 8)
    torch.testing.assert_close(layer.weight(), expected)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(layer(x), x @ expected + layer.bias)


def test_kron_sum_block_layout() -> None:
    rule = torch.zeros(2, 2, 2)
    rule[1, 0, 1] = 1.0  # only A_1 has one entry, at block (0, 1)
    fast = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3)
    W = kron_sum(rule, fast)
    assert W.shape == (4, 6)
    torch.testing.assert_close(W[:2, 3:], fast[1])
    assert W.abs().sum() == fast[1].abs().sum()


@pytest.mark.parametrize(
    ("config", "expected"),
    [(CompacterConfig(), 57_088), (CompacterPlusPlusConfig(), 28_576)],
    ids=["compacter", "compacter++"],
)
def test_bert_base_anchor_counts(config: CompacterConfig, expected: int) -> None:
    with torch.device("meta"):
        model = BertModel(BertConfig())
    lp.inject(model, config)
    assert lp.param_summary(model).trainable == expected
    # (4 * 192 + 4 * 6 + 24) down + (4 * 6 + 4 * 192 + 768) up per adapter, plus one shared 4x4x4 rule.
    per_adapter = (768 + 24 + 24) + (24 + 768 + 768)
    adapters = 24 if config.style == "houlsby" else 12
    assert expected == adapters * per_adapter + 4**3


def test_slow_weights_are_shared_across_layers_and_trained_from_all() -> None:
    model = tiny_model("bert")
    lp.inject(model, CompacterConfig())
    adapters = [m for m in model.modules() if isinstance(m, CompacterAdapter)]
    assert len(adapters) == 4  # 2 blocks x (attention, FFN)
    rules = {id(layer.phm_rule) for a in adapters for layer in (a.down, a.up)}
    assert len(rules) == 1
    keys = [k for k in lp.trainable_state_dict(model) if k.endswith("phm_rule")]
    assert len(keys) == 1
    perturb_trainable(model)
    first_output(model, model_inputs("bert")).sum().backward()
    rule = adapters[0].down.phm_rule
    assert rule.grad is not None and rule.grad.abs().sum() > 0


def test_unshared_rule_gives_one_per_phm_layer() -> None:
    model = tiny_model("bert")
    lp.inject(model, CompacterPlusPlusConfig(shared_phm_rule=False))
    keys = [k for k in lp.trainable_state_dict(model) if k.endswith("phm_rule")]
    assert len(keys) == 4  # 2 adapters x (down, up)


def test_placements_and_bottleneck_rounding_on_a_tiny_model() -> None:
    model = tiny_model("bert")
    changed = lp.inject(model, CompacterPlusPlusConfig())
    assert changed == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    adapter = model.get_submodule("encoder.layer.0.output.dense.adapter")
    # d = 32, 32 / 32 = 1 -> rounded up to phm_dim = 4.
    assert (adapter.down.in_features, adapter.down.out_features) == (32, 4)


def test_trained_compacter_changes_outputs_and_survives_save_load() -> None:
    inputs = model_inputs("bert")
    base = first_output(tiny_model("bert"), inputs)
    model = tiny_model("bert")
    lp.inject(model, CompacterConfig())
    perturb_trainable(model, scale=0.5)
    tuned = first_output(model, inputs)
    assert not torch.allclose(tuned, base, atol=1e-4)
    fresh = tiny_model("bert")
    lp.inject(fresh, CompacterConfig())
    lp.load_trainable_state_dict(fresh, lp.trainable_state_dict(model))
    torch.testing.assert_close(first_output(fresh, inputs), tuned, rtol=0, atol=0)


def test_bad_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of phm_dim"):
        CompacterConfig(bottleneck_size=6)
    with pytest.raises(ValueError, match=r"CompacterConfig\.style"):
        CompacterConfig(style="parallel")
    with pytest.raises(ValueError, match="phm_dim"):
        CompacterConfig(phm_dim=0)
    with pytest.raises(ValueError, match="multiple of phm_dim"):
        lp.inject(tiny_model("bert"), CompacterConfig(phm_dim=5, bottleneck_size=5))
    assert lp.config_from_dict({"method": "compacter++"}).style == "pfeiffer"
