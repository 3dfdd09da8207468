"""Every tuner keeps its own init through meta-device materialisation (the same battery for every tuner).

A large model is built on the meta device (``Trainer.init_module(empty_init=True)`` under
``ModelParallelStrategy``, ``with torch.device("meta")``), the tuner injected there, and the values come
later from ``to_empty()`` plus ``reset_parameters()``. Three ways of materialising are checked:

* ``lightning``: Lightning's own ``_materialize_distributed_module`` (what ``ModelParallelStrategy.setup``
  runs): ``to_empty()`` on the root, then ``reset_parameters()`` of every module holding tensors directly,
  parents before children;
* ``apply``: ``model.to_empty(...)`` and ``model.apply(reset_parameters)``, children before parents;
* ``assign``: the base weights loaded first with ``assign=True``-style replacement (the pretrained tensors
  taken over as they are), the rest (the tuner) materialised module by module with Fabric's
  ``_materialize_meta_tensors``, which refuses a module holding tensors without ``reset_parameters()``.

Afterwards the base weights are copied in (as a user loads pretrained ones) and the model is compared with
the same tuner injected into a normally built model: the same keys and tied tensors, the deterministic part
of the init (zeros, identities, constants) equal exactly, random tensors of the same scale, and the tuners
that are the identity when untrained give exactly the base output.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from lightning.fabric.utilities.init import _materialize_distributed_module, _materialize_meta_tensors
from torch import nn
from transformers import AutoConfig, AutoModel

import lightning_peft as lp
from lightning_peft.config import TunerConfig, available_tuners
from lightning_peft.tuners.bitfit import record_original_biases
from lightning_peft.tuners.lora import LoRALinear
from tests.models import (
    TINY_CONFIGS,
    VOCAB,
    first_output,
    model_inputs,
    routes_through_interface,
    tiny_model,
)
from tests.tuners.test_contract import default_config

# Early exit adds heads beside the forward (the model's outputs never change): its own battery is
# tests/early_exit and tests/tuners/test_early_exit.py.
METHODS = [m for m in available_tuners() if m != "early_exit"]
#: Non-default settings with an init of their own, checked like the registry's defaults.
VARIANTS: dict[str, Callable[[], TunerConfig]] = {
    "lora-gaussian": lambda: lp.LoRAConfig(init="gaussian"),
    "lora-embedding": lambda: lp.LoRAConfig(target_modules=["word_embeddings", "query"]),
    "bottleneck-houlsby-init": lambda: lp.BottleneckConfig(init="houlsby"),
    "compacter-own-rules-full-rank": lambda: lp.CompacterConfig(shared_phm_rule=False, phm_rank=None),
    "unified-gated-multi-head": lambda: lp.UnifiedConfig(
        points=[
            {
                "form": "bottleneck",
                "at": "attention_heads",
                "insertion": "parallel",
                "composition": "gated_add",
            },
            {"form": "bottleneck", "at": "ffn", "insertion": "sequential", "composition": "gated_add"},
        ]
    ),
    "unified-mam": lambda: lp.UnifiedConfig(preset="mam"),
    "unified-lora": lambda: lp.UnifiedConfig(preset="lora"),
    "adapterdrop-robust": lambda: lp.AdapterDropConfig(robust=True),
    "prefix-projection": lambda: lp.PrefixTuningConfig(projection=True, encoder_hidden_size=16),
    "ptuning-lstm": lambda: lp.PTuningConfig(encoder="lstm"),
}
CASES: dict[str, Callable[[], TunerConfig]] = {
    **{method: (lambda method=method: default_config(method)) for method in METHODS},
    **VARIANTS,
}
CPU = torch.device("cpu")
#: Seeds of the normal injections that tell deterministic init from random init, and bound the latter.
REFERENCE_SEEDS = range(4)


def _meta_bert() -> nn.Module:
    """``tiny_model("bert")``'s architecture on the meta device (no values)."""
    config = AutoConfig.for_model("bert", vocab_size=VOCAB, **TINY_CONFIGS["bert"])
    with torch.device("meta"):
        return AutoModel.from_config(config).eval()


def _skip_unsupported(case: str) -> None:
    config = CASES[case]()
    prefix = isinstance(config, lp.PrefixTuningConfig) or (
        isinstance(config, lp.UnifiedConfig) and any(p.form == "prefix" for p in config.design_points())
    )
    if prefix and not routes_through_interface("bert"):
        pytest.skip("prefix keys need AttentionInterface, which this transformers' BERT does not use")


def _inject(model: nn.Module, case: str) -> nn.Module:
    config = CASES[case]()
    if getattr(config, "needs_trained_adapters", False):  # AdapterFusion fuses named stage-1 adapters
        from lightning_peft import named

        for name in ("a", "b"):
            named.add_adapter(model, name, lp.BottleneckConfig(style="pfeiffer"))
    lp.inject(model, config)
    return model


def _canonical(name: str) -> str:
    """A tensor's name in the plain base model (wrappers keep the original layer as ``base_layer``)."""
    return name.replace(".base_layer.", ".").replace("base_layer.", "")


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, persistent or not, under every name."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


def _base_tensors() -> dict[str, torch.Tensor]:
    """The values a user loads: the normally built base model's parameters and buffers."""
    return {k: v.detach() for k, v in _tensors(tiny_model("bert")).items()}


@torch.no_grad()
def _copy_base(model: nn.Module) -> None:
    """Copy the base weights into a materialised model, as a user loads pretrained ones."""
    base = _base_tensors()
    for name, tensor in _tensors(model).items():
        if _canonical(name) in base:
            tensor.copy_(base[_canonical(name)])


@torch.no_grad()
def _assign_base(model: nn.Module) -> None:
    """Replace the meta base tensors by the loaded ones (what ``load_state_dict(assign=True)`` does)."""
    base = _base_tensors()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for table in (module._parameters, module._buffers):
            for local, tensor in table.items():
                source = base.get(_canonical(prefix + local))
                if tensor is None or source is None:
                    continue
                if isinstance(tensor, nn.Parameter):
                    table[local] = nn.Parameter(source.clone(), requires_grad=tensor.requires_grad)
                else:
                    table[local] = source.clone()


def _reset(module: nn.Module) -> None:
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()


def _lightning(model: nn.Module) -> None:
    _materialize_distributed_module(model, CPU)
    _copy_base(model)


def _apply(model: nn.Module) -> None:
    model.to_empty(device=CPU)
    model.apply(_reset)
    _copy_base(model)


def _assign(model: nn.Module) -> None:
    _assign_base(model)
    _materialize_meta_tensors(model, CPU)


MATERIALISE: dict[str, Callable[[nn.Module], None]] = {
    "lightning": _lightning,
    "apply": _apply,
    "assign": _assign,
}


def _materialised(case: str, how: str, *, record_biases: bool = True) -> nn.Module:
    """Tuner ``case`` injected on the meta device, materialised ``how``, the base weights loaded."""
    _skip_unsupported(case)
    model = _inject(_meta_bert(), case)
    assert any(p.is_meta for p in model.parameters())
    torch.manual_seed(1234)
    MATERIALISE[how](model)
    assert not any(t.is_meta for t in _tensors(model).values())
    if record_biases:  # BitFit: what disable_adapters restores, known once the base weights are loaded
        record_original_biases(model)
    return model


def _references(case: str) -> list[nn.Module]:
    """The tuner injected into the normally built base model, once per seed of the tuner's init."""
    models = []
    for seed in REFERENCE_SEEDS:
        model = tiny_model("bert")
        torch.manual_seed(seed)
        models.append(_inject(model, case))
    return models


def _rms(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


@pytest.mark.parametrize("how", list(MATERIALISE))
@pytest.mark.parametrize("case", list(CASES))
def test_materialised_tuner_has_its_own_init(case: str, how: str) -> None:
    model = _materialised(case, how)
    references = _references(case)
    reference = references[0]

    # Same tensors under the same names, the same ones tied (Compacter's shared rule), the same trained keys.
    got, expected = _tensors(model), _tensors(reference)
    assert list(got) == list(expected)
    assert len(list(model.parameters())) == len(list(reference.parameters()))
    assert list(lp.trainable_state_dict(model)) == list(lp.trainable_state_dict(reference))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in reference.named_parameters() if p.requires_grad
    }

    for name, tensor in got.items():
        samples = [_tensors(r)[name].detach() for r in references]
        assert tensor.shape == samples[0].shape and tensor.dtype == samples[0].dtype, name
        if all(torch.equal(samples[0], s) for s in samples[1:]):
            # Deterministic: loaded base weights, zeros, identities, constants.
            assert torch.equal(tensor, samples[0]), f"{name}: differs from the tuner's init"
        elif tensor.numel() >= 16:  # random: the scale of the tuner's init (a wrong init is 5x-500x off)
            scale = sum(map(_rms, samples)) / len(samples)
            assert 0.5 * scale <= _rms(tensor) <= 2.0 * scale, (
                f"{name}: rms {_rms(tensor):.3g} vs {scale:.3g}"
            )
        else:  # a handful of values (a gate's bias): within the bounds the init draws from
            bound = max(float(s.abs().max()) for s in samples)
            assert float(tensor.abs().max()) <= 1.5 * bound, name


@pytest.mark.parametrize("how", list(MATERIALISE))
@pytest.mark.parametrize("case", list(CASES))
def test_materialised_untrained_tuner_changes_nothing(case: str, how: str) -> None:
    if not CASES[case]().identity_at_init:
        pytest.skip(f"{case}: identity_at_init=False (virtual tokens, prefix keys, fused adapters...)")
    model = _materialised(case, how)
    inputs = model_inputs("bert")
    expected = first_output(tiny_model("bert"), inputs)
    torch.testing.assert_close(first_output(model, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_materialised_tuner_trains(case: str) -> None:
    """Gradients reach exactly the trainable tensors after Lightning's materialisation."""
    model = _materialised(case, "lightning")
    out = model(**model_inputs("bert"))
    (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and {n for n, p in model.named_parameters() if p.grad is not None} == trainable


def test_lora_on_meta_is_reset_to_a_no_op_by_its_own_layers() -> None:
    """The failure this guards against: a plain ``nn.Linear`` ``lora_B`` resets to Kaiming-uniform."""
    model = _materialised("lora", "lightning")
    lora_b = [m.lora_B for m in model.modules() if isinstance(m, LoRALinear)]
    assert lora_b and all(isinstance(b, nn.Linear) and not b.weight.any() for b in lora_b)


def test_bitfit_records_original_biases_after_the_base_weights_load() -> None:
    model = _materialised("bitfit", "lightning", record_biases=False)
    with pytest.raises(ValueError, match="record_original_biases"), lp.disable_adapters(model):
        pass
    assert record_original_biases(model)
    inputs = model_inputs("bert")
    with torch.no_grad():
        for p in lp.trainable_state_dict(model).values():
            p.add_(0.1)
    with lp.disable_adapters(model):  # the loaded (pretrained) biases, not the trained ones
        torch.testing.assert_close(first_output(model, inputs), first_output(tiny_model("bert"), inputs))
    assert record_original_biases(model) == []  # recorded once; training does not overwrite them


def test_text_initialised_prompt_is_refused_on_meta() -> None:
    with pytest.raises(ValueError, match="meta device"):
        lp.inject(_meta_bert(), lp.PromptTuningConfig(init="text", init_text="hi", tokenizer=object()))


def test_fusion_of_saved_adapters_is_refused_on_meta() -> None:
    with pytest.raises(ValueError, match="meta device"):
        lp.inject(_meta_bert(), lp.FusionConfig(adapters={"a": "runs/a", "b": "runs/b"}))


def test_seeded_lora_starts_from_peft_lora_a() -> None:
    """Normal injection draws as before the reset-carrying layers: a seeded LoRA starts from PEFT's A."""
    peft = pytest.importorskip("peft")
    ours = tiny_model("bert")
    torch.manual_seed(5)
    lp.inject(ours, lp.LoRAConfig(r=4, target_modules=["query", "value"]))
    theirs = tiny_model("bert")
    torch.manual_seed(5)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, target_modules=["query", "value"]))
    a = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    b = {
        k.removeprefix("base_model.model.").replace(".default", ""): v
        for k, v in theirs.state_dict().items()
        if "lora_" in k
    }
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
