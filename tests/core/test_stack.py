"""Several tuners on one model: the contract battery over pairs, collisions, and the PEFT callback."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.stack import TunerStack
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer
from tests.models import first_output, model_inputs, perturb_trainable, routes_through_interface, tiny_model

PAIRS: dict[str, list] = {
    "lora+bitfit": [lp.LoRAConfig(r=4), lp.BitFitConfig()],
    "lora+prompt": [lp.LoRAConfig(r=4), lp.PromptTuningConfig(num_virtual_tokens=3)],
    "houlsby+prefix": [lp.BottleneckConfig(style="houlsby"), lp.PrefixTuningConfig(num_virtual_tokens=3)],
    "lora+kadapter": [lp.LoRAConfig(r=4), lp.KAdapterConfig(name="k", hidden=16, num_heads=2, ffn_size=32)],
}


def _stacked(pair: str) -> torch.nn.Module:
    if "prefix" in pair and not routes_through_interface("bert"):
        pytest.skip("prefix keys need AttentionInterface, which this transformers' BERT does not use")
    model = tiny_model("bert")
    lp.inject(model, copy.deepcopy(PAIRS[pair]))
    return model


@pytest.mark.parametrize("pair", PAIRS)
def test_trainable_tensors_are_the_union_of_the_members(pair: str) -> None:
    stacked = _stacked(pair)
    expected: set[str] = set()
    for config in PAIRS[pair]:
        alone = tiny_model("bert")  # (skipped above where a member cannot inject)
        lp.inject(alone, copy.deepcopy(config))
        expected |= set(lp.trainable_state_dict(alone))
    keys = set(lp.trainable_state_dict(stacked))
    # a member adapting a wrapped layer (BitFit under LoRA) finds its bias one level down
    assert {k.replace(".base_layer", "") for k in keys} == {k.replace(".base_layer", "") for k in expected}
    assert all(p.requires_grad == (n in keys) for n, p in stacked.named_parameters())
    config = lp.get_config(stacked)
    assert isinstance(config, TunerStack) and [c.method for c in config] == [c.method for c in PAIRS[pair]]


@pytest.mark.parametrize("pair", PAIRS)
def test_save_load_round_trip_and_disable(pair: str) -> None:
    inputs = model_inputs("bert")
    base = first_output(tiny_model("bert"), inputs)
    trained = _stacked(pair)
    perturb_trainable(trained)
    out = first_output(trained, inputs)
    fresh = _stacked(pair)
    lp.load_trainable_state_dict(fresh, lp.trainable_state_dict(trained))
    torch.testing.assert_close(first_output(fresh, inputs), out, rtol=0, atol=0)
    if all(c.identity_at_init for c in PAIRS[pair]):  # virtual tokens / prefixes change the sequence
        with lp.disable_adapters(trained):
            torch.testing.assert_close(first_output(trained, inputs), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(first_output(trained, inputs), out, rtol=0, atol=0)


def test_merge_folds_the_mergeable_members_and_unload_restores_the_base() -> None:
    inputs = model_inputs("bert")
    model = _stacked("lora+bitfit")
    perturb_trainable(model)
    out = first_output(model, inputs)
    lp.merge(model)
    torch.testing.assert_close(first_output(model, inputs), out, rtol=1e-5, atol=1e-5)
    lp.unmerge(model)
    lp.unload(model, merge_weights=True)  # LoRA folded, BitFit's biases stay in place: the tuned function
    assert lp.get_config(model) is None
    assert {type(m).__name__ for m in model.modules()} == {
        type(m).__name__ for m in tiny_model("bert").modules()
    }
    torch.testing.assert_close(first_output(model, inputs), out, rtol=1e-5, atol=1e-5)


def test_unload_without_merge_leaves_the_base() -> None:
    inputs = model_inputs("bert")
    base = first_output(tiny_model("bert"), inputs)
    for pair in PAIRS:
        if "prefix" in pair and not routes_through_interface("bert"):
            continue  # prefix tuning needs AttentionInterface (transformers >= 5 for BERT)
        model = _stacked(pair)
        lp.unload(model, merge_weights=False)
        if "bitfit" not in pair:
            torch.testing.assert_close(first_output(model, inputs), base, rtol=0, atol=1e-6)
        assert set(model.state_dict()) == set(tiny_model("bert").state_dict())


def test_collision_names_the_module_and_leaves_the_model_as_it_was() -> None:
    model = tiny_model("bert")
    before = set(model.state_dict())
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.attention\.output\.dense'.*already wraps"):
        lp.inject(model, [lp.LoRAConfig(target_modules="all-linear"), lp.BottleneckConfig(style="houlsby")])
    assert lp.get_config(model) is None and set(model.state_dict()) == before
    lp.inject(model, lp.LoRAConfig())  # clean: a new injection works


def test_stack_round_trips_through_dicts() -> None:
    config = TunerStack(configs=[c.to_dict() for c in PAIRS["lora+bitfit"]])
    again = lp.config_from_dict(config.to_dict())
    assert isinstance(again, TunerStack) and not config.diff(again)
    with pytest.raises(TypeError, match="list of tuner configs"):
        TunerStack(configs=lp.LoRAConfig())
    with pytest.raises(ValueError, match="give it to the member"):
        TunerStack(configs=[lp.LoRAConfig()], target_modules=["query"])


def _fit(tmp_path: Path, epochs: int, ckpt_path: str | None = None) -> tuple[TinyClassifier, ModelCheckpoint]:
    module = TinyClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    configs = [lp.LoRAConfig(r=4, modules_to_save=["classifier"]), lp.BitFitConfig(biases="layernorm")]
    trainer(tmp_path, [PEFT(configs), ckpt], max_epochs=epochs).fit(
        module, tiny_loader(), ckpt_path=ckpt_path
    )
    return module, ckpt


def test_peft_callback_trains_checkpoints_and_resumes_a_stack(tmp_path: Path) -> None:
    full, _ = _fit(tmp_path / "a", epochs=2)
    first, _ = _fit(tmp_path / "b", epochs=1)
    path = tmp_path / "b" / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    keys = {k for k in saved["state_dict"] if not k.startswith("__")}
    assert keys == set(lp.trainable_state_dict(first))
    assert any("lora_A" in k for k in keys) and any("LayerNorm.bias" in k for k in keys)
    steps_per_epoch = len(tiny_loader())
    assert saved["global_step"] == steps_per_epoch and saved["epoch"] == 0
    resumed = TinyClassifier()
    configs = [lp.LoRAConfig(r=4, modules_to_save=["classifier"]), lp.BitFitConfig(biases="layernorm")]
    run = trainer(tmp_path / "b", [PEFT(configs)], max_epochs=2)
    starts: list[int] = []
    resumed.on_train_batch_start = lambda *_: starts.append(run.global_step)  # type: ignore[method-assign]
    run.fit(resumed, tiny_loader(), ckpt_path=str(path))
    assert starts[0] == steps_per_epoch, "the resumed run must start at the checkpoint's step"
    expected = lp.trainable_state_dict(full)
    got = lp.trainable_state_dict(resumed)
    assert list(expected) == list(got)
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name
