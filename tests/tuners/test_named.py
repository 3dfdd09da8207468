"""Named adapters: add, activate (one or a set), deactivate, delete, train one, save and load by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lightning_peft as lp
from lightning_peft import named
from lightning_peft.tuners.bottleneck import AdapterAfter
from lightning_peft.tuners.compacter import CompacterPlusPlusConfig
from tests.models import first_output, model_inputs, tiny_model

PFEIFFER = lp.BottleneckConfig(style="pfeiffer")
HOULSBY = lp.BottleneckConfig(style="houlsby", reduction_factor=8)


def _perturbed(model: torch.nn.Module, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in named.adapter_state_dict(model, name).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)


def _two_adapters() -> torch.nn.Module:
    model = tiny_model("bert")
    named.add_adapter(model, "a", PFEIFFER)
    named.add_adapter(model, "b", HOULSBY)
    _perturbed(model, "a", 1)
    _perturbed(model, "b", 2)
    return model


def _single(config: lp.TunerConfig, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The same adapter injected the single-adapter way, with the same tensors."""
    model = tiny_model("bert")
    lp.inject(model, config)
    lp.load_trainable_state_dict(model, state)
    return model


def test_each_active_adapter_equals_the_single_adapter_model() -> None:
    inputs = model_inputs("bert")
    model = _two_adapters()
    assert named.list_adapters(model) == ["a", "b"]
    assert first_output(model, inputs).equal(first_output(tiny_model("bert"), inputs))  # none active yet
    for name, config in (("a", PFEIFFER), ("b", HOULSBY)):
        named.set_active_adapters(model, name)
        assert named.active_adapters(model) == [name]
        expected = first_output(_single(config, named.adapter_state_dict(model, name)), inputs)
        torch.testing.assert_close(first_output(model, inputs), expected, rtol=0, atol=0)
    named.deactivate_adapters(model)
    torch.testing.assert_close(first_output(model, inputs), first_output(tiny_model("bert"), inputs))


def test_a_set_of_adapters_runs_in_order() -> None:
    model = _two_adapters()
    named.set_active_adapters(model, ["a", "b"])
    stack = model.get_submodule("encoder.layer.0.output.dense")
    h = torch.randn(2, 3, 64)  # the FFN output projection maps 64 -> 32
    torch.testing.assert_close(
        stack(h), stack.adapters["b"](stack.adapters["a"](stack.base_layer(h))), rtol=0, atol=0
    )
    attention_stack = model.get_submodule("encoder.layer.0.attention.output.dense")
    assert attention_stack.active_names == ("b",)  # "a" (Pfeiffer) has no adapter there
    assert model.get_submodule("encoder.layer.1.output.dense")._active == [
        model.get_submodule("encoder.layer.1.output.dense").adapters[n] for n in ("a", "b")
    ]


def test_train_adapter_trains_only_that_adapter() -> None:
    model = _two_adapters()
    named.train_adapter(model, "b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)
    assert trainable == set(lp.trainable_state_dict(model))
    first_output(model, model_inputs("bert")).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable


def test_delete_restores_base_layers_where_nothing_is_left() -> None:
    model = _two_adapters()
    named.delete_adapter(model, "b")
    assert named.list_adapters(model) == ["a"]
    assert isinstance(model.get_submodule("encoder.layer.0.attention.output"), torch.nn.Module)
    assert type(model.get_submodule("encoder.layer.0.attention.output.dense")) is torch.nn.Linear
    assert isinstance(model.get_submodule("encoder.layer.0.output.dense"), named.AdapterStack)
    named.delete_adapter(model, "a")
    assert not named.stacks(model)
    with pytest.raises(ValueError, match="unknown adapter"):
        named.delete_adapter(model, "a")


def test_save_and_load_by_name(tmp_path: Path) -> None:
    inputs = model_inputs("bert")
    model = _two_adapters()
    named.add_adapter(model, "c", CompacterPlusPlusConfig())
    _perturbed(model, "c", 3)
    for n in ("a", "b", "c"):
        named.save_adapter(model, n, tmp_path)
    named.set_active_adapters(model, ["c", "a"])
    expected = first_output(model, inputs)

    other = tiny_model("bert")
    named.load_adapter(other, tmp_path, "c")
    named.load_adapter(other, tmp_path, "a")
    named.set_active_adapters(other, ["c", "a"])
    torch.testing.assert_close(first_output(other, inputs), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"no adapter named 'd'.*'a', 'b', 'c'"):
        named.load_adapter(other, tmp_path, "d")
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) 'b'; this model has: 'c', 'a'"):
        named.set_active_adapters(other, "b")


def test_loading_into_a_model_of_another_width_is_refused(tmp_path: Path) -> None:
    model = _two_adapters()
    named.save_adapter(model, "a", tmp_path)
    wide = tiny_model("bert")
    wide.encoder.layer[0].output.dense = torch.nn.Linear(64, 48)  # another width at one placement
    with pytest.raises(ValueError, match="shape mismatch for adapter 'a'"):
        named.load_adapter(wide, tmp_path, "a")
    assert named.list_adapters(wide) == []


def test_bad_names_and_mixing_with_a_single_adapter_tuner() -> None:
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="identifier"):
        named.add_adapter(model, "a.b", PFEIFFER)
    named.add_adapter(model, "a", PFEIFFER)
    with pytest.raises(ValueError, match="already exists"):
        named.add_adapter(model, "a", PFEIFFER)
    single = tiny_model("bert")
    lp.inject(single, PFEIFFER)
    assert isinstance(single.get_submodule("encoder.layer.0.output.dense"), AdapterAfter)
    with pytest.raises(ValueError, match="already wraps"):
        named.add_adapter(single, "a", PFEIFFER)
    with pytest.raises(TypeError, match="bottleneck-style"):
        named.add_adapter(tiny_model("bert"), "x", lp.LoRAConfig())


def test_disable_adapters_switches_stacks_off() -> None:
    model = _two_adapters()
    named.set_active_adapters(model, ["a", "b"])
    base = first_output(tiny_model("bert"), model_inputs("bert"))
    with lp.disable_adapters(model):
        torch.testing.assert_close(first_output(model, model_inputs("bert")), base)
    assert not torch.allclose(first_output(model, model_inputs("bert")), base)


def test_named_adapters_refuse_shared_layer_norms_and_other_methods() -> None:
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="cannot train the base LayerNorms"):
        named.add_adapter(model, "a", lp.BottleneckConfig(train_layer_norms=True))
    with pytest.raises(TypeError, match="bottleneck-style"):
        named.add_adapter(model, "b", lp.LoRAConfig(target_modules=["query"]))
