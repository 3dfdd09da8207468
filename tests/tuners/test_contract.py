"""The same battery for every registered tuner (new tuners join automatically)."""

from __future__ import annotations

import copy

import pytest
import torch

import lightning_peft as lp
from lightning_peft.config import available_tuners, get_tuner_config
from lightning_peft.layers import Mergeable
from tests.models import (
    first_output,
    model_inputs,
    perturb_trainable,
    routes_through_interface,
    tiny_model,
)

# Early exit adds heads beside the forward (the model's outputs never change): its own battery is
# tests/early_exit and tests/tuners/test_early_exit.py.
METHODS = [m for m in available_tuners() if m != "early_exit"]
#: Methods whose config has no meaningful all-defaults form: what the battery builds for them.
NON_DEFAULT: dict[str, dict] = {
    "stack": {"configs": [lp.LoRAConfig(r=4), lp.BitFitConfig(biases="layernorm")]},
    "unified": {"preset": "parallel"},
}


def default_config(method: str) -> lp.TunerConfig:
    return get_tuner_config(method)(**NON_DEFAULT.get(method, {}))


def _injected(method: str, seed: int = 0) -> torch.nn.Module:
    model = tiny_model("bert", seed=seed)
    config = default_config(method)
    if method == "prefix" and not routes_through_interface("bert"):
        pytest.skip("prefix keys need AttentionInterface, which this transformers' BERT does not use")
    if getattr(config, "needs_trained_adapters", False):
        _add_trained_adapters(model)
    lp.inject(model, config)
    return model


def _add_trained_adapters(model: torch.nn.Module) -> None:
    """Two named Pfeiffer adapters with fixed non-zero weights: what stage 1 of AdapterFusion leaves."""
    from lightning_peft import named

    g = torch.Generator().manual_seed(99)
    for name in ("a", "b"):
        named.add_adapter(model, name, lp.BottleneckConfig(style="pfeiffer"))
        with torch.no_grad():
            for p in named.adapter_state_dict(model, name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def test_registry_holds_the_foundation_methods() -> None:
    assert {"lora", "bottleneck", "bitfit"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_untrained_tuner_changes_nothing(method: str) -> None:
    if not default_config(method).identity_at_init:
        pytest.skip(
            f"{method}: identity_at_init=False (virtual tokens, prefix keys or fused stage-1 adapters)"
        )
    base = tiny_model("bert")
    inputs = model_inputs("bert")
    expected = first_output(base, inputs)
    model = _injected(method)
    torch.testing.assert_close(first_output(model, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_only_tuner_parameters_train(method: str) -> None:
    model = _injected(method)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lp.trainable_state_dict(model))
    assert 0 < lp.param_summary(model).trainable < lp.param_summary(model).total
    # A backward pass gives gradients to exactly those parameters.
    out = model(**model_inputs("bert"))
    (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_restores_outputs(method: str) -> None:
    model = _injected(method)
    perturb_trainable(model)
    inputs = model_inputs("bert")
    expected = first_output(model, inputs)
    saved = {k: v.clone() for k, v in lp.trainable_state_dict(model).items()}

    fresh = _injected(method)
    assert not torch.equal(first_output(fresh, inputs), expected)
    lp.load_trainable_state_dict(fresh, saved)
    torch.testing.assert_close(first_output(fresh, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_disable_adapters_gives_the_base_model(method: str) -> None:
    base_out = first_output(tiny_model("bert"), model_inputs("bert"))
    model = _injected(method)
    perturb_trainable(model)
    tuned = first_output(model, model_inputs("bert"))
    # (Virtual-token tuners also change the output length.)
    assert tuned.shape != base_out.shape or not torch.allclose(tuned, base_out)
    with lp.disable_adapters(model):
        torch.testing.assert_close(first_output(model, model_inputs("bert")), base_out)
    torch.testing.assert_close(first_output(model, model_inputs("bert")), tuned, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged_for_mergeable_tuners(method: str) -> None:
    model = _injected(method)
    if not any(isinstance(m, Mergeable) for m in model.modules()):
        with pytest.raises(ValueError, match="mergeable"):
            lp.merge(model)
        return
    perturb_trainable(model)
    inputs = model_inputs("bert")
    unmerged = first_output(model, inputs)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    lp.merge(model)
    torch.testing.assert_close(first_output(model, inputs), unmerged, rtol=1e-5, atol=1e-5)
    lp.unmerge(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    merged_plain = lp.unload(copy.deepcopy(model))
    assert not any(isinstance(m, lp.layers.Adapter) for m in merged_plain.modules())
    torch.testing.assert_close(first_output(merged_plain, inputs), unmerged, rtol=1e-5, atol=1e-5)
