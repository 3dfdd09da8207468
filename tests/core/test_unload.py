"""``unload`` leaves exactly the plain base model: no tuner hooks, modules, parameters, buffers or markers,
the same state-dict keys and outputs as an untouched copy of the base, for wrapping tuners and for those
acting through hooks (prompt tuning, P-tuning, K-Adapter, AdapterDrop, the unified view's parallel
adapters)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.api import CONFIG_ATTR
from lightning_peft.attention.interface import routes_through_interface
from lightning_peft.layers import STATE_ATTR, TRAINABLE_ATTR, Adapter, HookOwner
from lightning_peft.tuners.kadapter import KAdapterConfig, add_kadapter
from tests.models import first_output, model_inputs, perturb_trainable, tiny_model

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks")


def _kadapters(model: nn.Module) -> None:
    lp.inject(model, KAdapterConfig(name="fact", hidden=16, dropout=0.0))
    perturb_trainable(model)  # the first one trained, then frozen by the second
    add_kadapter(model, KAdapterConfig(name="ling", hidden=16, dropout=0.0, adapter_layers=[1]))


def _config(config: lp.TunerConfig) -> Callable[[nn.Module], None]:
    return lambda model: lp.inject(model, config)


MULTI_HEAD = {"form": "bottleneck", "at": "attention_heads", "insertion": "parallel", "bottleneck_size": 2}

#: (case id, family, how to put the tuner on a fresh tiny model); none of them can be merged.
HOOKED: list[tuple[str, str, Callable[[nn.Module], None]]] = [
    ("prompt-bert", "bert", _config(lp.PromptTuningConfig(num_virtual_tokens=3))),
    ("prompt-gpt2", "gpt2", _config(lp.PromptTuningConfig(num_virtual_tokens=3))),
    ("prompt-t5", "t5", _config(lp.PromptTuningConfig(num_virtual_tokens=3))),
    ("ptuning-mlp-bert", "bert", _config(lp.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8))),
    ("ptuning-lstm-gpt2", "gpt2", _config(lp.PTuningConfig(num_virtual_tokens=3, encoder="lstm"))),
    ("kadapter-bert", "bert", _kadapters),
    ("kadapter-gpt2", "gpt2", _kadapters),
    ("adapterdrop-bert", "bert", _config(lp.AdapterDropConfig(drop_layers=1))),
    ("adapterdrop-robust-gpt2", "gpt2", _config(lp.AdapterDropConfig(robust=True))),
    ("unified-parallel-bert", "bert", _config(lp.UnifiedConfig(preset="parallel"))),
    ("unified-scaled-parallel-gpt2", "gpt2", _config(lp.UnifiedConfig(preset="scaled_parallel"))),
    ("unified-multi-head-bert", "bert", _config(lp.UnifiedConfig(points=[MULTI_HEAD]))),
    ("bottleneck-bert", "bert", _config(lp.BottleneckConfig())),
    ("prefix-bert", "bert", _config(lp.PrefixTuningConfig(num_virtual_tokens=3))),
    ("prefix-mlp-gpt2", "gpt2", _config(lp.PrefixTuningConfig(num_virtual_tokens=3, projection=True))),
    ("prefix-t5", "t5", _config(lp.PrefixTuningConfig(num_virtual_tokens=3))),
    ("unified-mam-bert", "bert", _config(lp.UnifiedConfig(preset="mam"))),
]


def _marks(case: str, family: str) -> list[pytest.MarkDecorator]:
    """Prefix keys need the family's attention to run through AttentionInterface (transformers 5)."""
    if "prefix" not in case and "mam" not in case:
        return []
    layer = next(m for m in tiny_model(family).modules() if "Attention" in type(m).__name__)
    return [pytest.mark.skipif(not routes_through_interface(layer), reason="attention computed inline")]


CASES = pytest.mark.parametrize(
    ("family", "attach"), [pytest.param(f, a, id=c, marks=_marks(c, f)) for c, f, a in HOOKED]
)


def _tuned(family: str, attach: Callable[[nn.Module], None]) -> nn.Module:
    model = tiny_model(family)
    attach(model)
    perturb_trainable(model)
    return model


def _hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(len(getattr(m, d)) for d in _HOOK_DICTS) for n, m in model.named_modules()}


def _attn_implementations(model: nn.Module) -> dict[str, str | None]:
    """Every config's attention implementation (encoder-decoders keep copies in their stacks)."""
    configs = {n: getattr(m, "config", None) for n, m in model.named_modules()}
    return {n: getattr(c, "_attn_implementation", None) for n, c in configs.items() if c is not None}


def assert_plain_base(model: nn.Module, family: str) -> None:
    """``model`` is structurally and numerically the untouched base model of ``family``."""
    base = tiny_model(family)
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in base.named_modules()}
    assert not any(isinstance(m, (Adapter, HookOwner)) for m in model.modules())
    for module in model.modules():
        assert not {TRAINABLE_ATTR, STATE_ATTR, CONFIG_ATTR} & set(vars(module)), type(module).__name__
    assert _hook_counts(model) == _hook_counts(base)
    assert _attn_implementations(model) == _attn_implementations(base)
    state, expected = model.state_dict(), base.state_dict()
    assert list(state) == list(expected)
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in base.named_buffers()]
    inputs = model_inputs(family)
    with torch.no_grad():
        want = first_output(base, inputs)
        for _ in range(2):  # the second forward too: nothing left behind by the first
            torch.testing.assert_close(first_output(model, inputs), want, rtol=0, atol=0)


@CASES
def test_unload_leaves_the_plain_base_model(family: str, attach: Callable[[nn.Module], None]) -> None:
    model = _tuned(family, attach)
    inputs = model_inputs(family)
    with torch.no_grad():
        assert not torch.equal(first_output(model, inputs), first_output(tiny_model(family), inputs))
    assert lp.unload(model, merge_weights=False) is model
    assert_plain_base(model, family)
    lp.inject(model, lp.LoRAConfig(r=2))  # a new tuner goes on as on a fresh model
    assert lp.get_config(model) is not None


@CASES
def test_disabled_adapters_compute_what_unload_leaves(
    family: str, attach: Callable[[nn.Module], None]
) -> None:
    model = _tuned(family, attach)
    inputs = model_inputs(family)
    with torch.no_grad():
        tuned = first_output(model, inputs)
        with lp.disable_adapters(model):
            disabled = first_output(model, inputs)
        assert torch.equal(first_output(model, inputs), tuned)  # back on after the block
        lp.unload(model, merge_weights=False)
        torch.testing.assert_close(first_output(model, inputs), disabled, rtol=0, atol=0)


@CASES
def test_merge_weights_refuses_what_cannot_fold_and_changes_nothing(
    family: str, attach: Callable[[nn.Module], None]
) -> None:
    model = _tuned(family, attach)
    inputs = model_inputs(family)
    with torch.no_grad():
        tuned = first_output(model, inputs)
    hooks, keys = _hook_counts(model), list(model.state_dict())
    with pytest.raises(ValueError, match="cannot be merged into the base weights; use merge_weights=False"):
        lp.unload(model)
    assert _hook_counts(model) == hooks and list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(first_output(model, inputs), tuned)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_lora_unload_with_and_without_merging(family: str) -> None:
    model = _tuned(family, _config(lp.LoRAConfig(r=4, alpha=8)))
    inputs = model_inputs(family)
    with torch.no_grad():
        tuned = first_output(model, inputs)
    merged = lp.unload(copy.deepcopy(model))
    assert list(merged.state_dict()) == list(tiny_model(family).state_dict())
    assert not any(isinstance(m, Adapter) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(first_output(merged, inputs), tuned, rtol=1e-5, atol=1e-5)
    lp.unload(model, merge_weights=False)
    assert_plain_base(model, family)


def test_bitfit_unload_keeps_trained_biases_and_drops_the_saved_originals() -> None:
    model = _tuned("bert", _config(lp.BitFitConfig()))
    lp.unload(model)
    base = tiny_model("bert")
    assert list(model.state_dict()) == list(base.state_dict())
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in base.state_dict().items())


def test_prompt_unload_removes_the_module_from_the_hf_root_and_its_encoder_hook() -> None:
    model = _tuned("t5", _config(lp.PromptTuningConfig(num_virtual_tokens=2)))
    prompt = model.prompt_encoder
    assert len(prompt._handles) == 2 and len(model.get_encoder()._forward_pre_hooks) == 1
    lp.unload(model, merge_weights=False)
    assert "prompt_encoder" not in model._modules and not prompt._handles
    assert not model.get_encoder()._forward_pre_hooks and not model._forward_pre_hooks
    prompt.remove_hooks()  # a second call is harmless


class _Stray(nn.Module):
    """A tuner-like module (it can be disabled) that reaches into the model without keeping handles."""

    def __init__(self) -> None:
        super().__init__()
        self.disabled = False
        self.weight = nn.Parameter(torch.zeros(1))


def test_a_tuner_module_without_remove_hooks_is_refused_before_anything_changes() -> None:
    model = _tuned("bert", _config(lp.LoRAConfig(r=2)))
    model.add_module("stray", _Stray())
    with pytest.raises(ValueError, match=r"cannot unload 'stray' \(_Stray\): .* must implement remove_hooks"):
        lp.unload(model, merge_weights=False)
    assert isinstance(model.encoder.layer[0].attention.self.query, Adapter)  # untouched


@pytest.mark.parametrize(
    "attach",
    [
        _kadapters,
        _config(lp.AdapterDropConfig(robust=True)),
        _config(lp.PromptTuningConfig(num_virtual_tokens=2)),
    ],
    ids=["kadapter", "adapterdrop", "prompt"],
)
def test_a_deep_copy_owns_its_hooks(attach: Callable[[nn.Module], None]) -> None:
    """Hooks of a deep copy drive the copy (bound methods, not closures over the original), and unloading
    the copy leaves the original tuned."""
    model = _tuned("bert", attach)
    clone = copy.deepcopy(model)
    inputs = model_inputs("bert")
    with torch.no_grad():
        tuned = first_output(model, inputs)
        torch.testing.assert_close(first_output(clone, inputs), tuned, rtol=0, atol=0)
        lp.unload(clone, merge_weights=False)
        assert torch.equal(first_output(model, inputs), tuned)
    assert_plain_base(clone, "bert")
