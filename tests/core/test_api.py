"""The free functions of lightning_peft.api and load_checkpoint: modes, bad inputs, base-model checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.layers import META_KEY
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer
from tests.models import first_output, model_inputs, perturb_trainable, tiny_model

DROPOUT_CONFIGS = {
    "lora": lambda: lp.LoRAConfig(dropout=0.5),
    "ptuning": lambda: lp.PTuningConfig(num_virtual_tokens=3),
    "kadapter": lambda: lp.KAdapterConfig(name="k", hidden=16, num_heads=2, ffn_size=32, dropout=0.5),
}


@pytest.mark.parametrize("method", DROPOUT_CONFIGS)
def test_new_modules_follow_the_mode_of_the_model_they_join(method: str) -> None:
    """Regression: LoRA dropout stayed in train mode inside an eval-mode model (outputs differed by 1.87)."""
    model = tiny_model("bert")  # eval mode, like every from_pretrained model
    lp.inject(model, DROPOUT_CONFIGS[method]())
    perturb_trainable(model, scale=0.5)
    assert not any(m.training for m in model.modules())
    inputs = model_inputs("bert")
    torch.testing.assert_close(first_output(model, inputs), first_output(model, inputs), rtol=0, atol=0)
    model.train()
    assert all(m.training for m in model.modules())
    training = tiny_model("bert").train()
    lp.inject(training, DROPOUT_CONFIGS[method]())
    assert all(m.training for m in training.modules())


def test_modules_to_save_string_is_one_name() -> None:
    config = lp.LoRAConfig(modules_to_save="classifier")
    assert config.modules_to_save == ["classifier"]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda: lp.LoRAConfig(alpha="16"), ["LoRAConfig.alpha", "number"]),
        (lambda: lp.BottleneckConfig(reduction_factor="4"), ["number"]),
        (lambda: lp.UnifiedConfig(), ["preset", "points"]),
        (lambda: lp.inject(None, lp.LoRAConfig()), ["nn.Module"]),
        (lambda: lp.inject(tiny_model("bert"), lp.BottleneckConfig(reduction_factor=1000)), ["width", "< 1"]),
        (lambda: lp.load_trainable_state_dict(tiny_model("bert"), "adapter.pt"), ["path", "load_checkpoint"]),
    ],
)
def test_bad_input_is_refused_with_the_fix(make, words: list[str]) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        make()
    assert all(w in str(info.value) for w in words), str(info.value)


def test_whole_checkpoint_and_prefixed_keys_get_a_hint() -> None:
    model = tiny_model("bert")
    lp.inject(model, lp.LoRAConfig())
    state = lp.trainable_state_dict(model)
    fresh = tiny_model("bert")
    lp.inject(fresh, lp.LoRAConfig())
    lp.load_trainable_state_dict(fresh, {"state_dict": state, "global_step": 3})  # a whole checkpoint
    assert all(torch.equal(v, lp.trainable_state_dict(fresh)[k]) for k, v in state.items())
    prefixed = {f"backbone.{k}": v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"prefix 'backbone\.'"):
        lp.load_trainable_state_dict(model, prefixed)


def _checkpoint(tmp_path: Path) -> tuple[Path, TinyClassifier]:
    module = TinyClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    config = lp.LoRAConfig(r=4, modules_to_save=["classifier"])
    trainer(tmp_path, [PEFT(config), ckpt], max_epochs=1).fit(module, tiny_loader())
    return tmp_path / "ckpt" / "last.ckpt", module


def test_load_checkpoint_gives_the_trained_model_back(tmp_path: Path) -> None:
    path, trained = _checkpoint(tmp_path)
    fresh = lp.load_checkpoint(TinyClassifier(), path).eval()
    ids = next(iter(tiny_loader()))[0]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), trained.eval()(ids), rtol=0, atol=0)
    assert lp.get_config(fresh).method == "lora"


def test_load_checkpoint_refuses_another_base_and_the_plain_api_checks_it_too(tmp_path: Path) -> None:
    path, _ = _checkpoint(tmp_path)
    with pytest.raises(ValueError, match="different base model"):
        lp.load_checkpoint(TinyClassifier(seed=5), path)
    checkpoint = torch.load(path, weights_only=True)
    assert META_KEY in checkpoint and META_KEY not in checkpoint["state_dict"]  # state_dict: tensors only
    other = TinyClassifier(seed=5)
    lp.inject(other, lp.LoRAConfig(r=4, modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match="different base model"):
        lp.load_trainable_state_dict(other, checkpoint)  # our save format carries the fingerprint


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated", b"\x00\x01random bytes"])
def test_corrupt_checkpoints_name_the_file_and_the_cause(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"broken\.ckpt.*(empty|truncated|not a PyTorch checkpoint)"):
        lp.load_checkpoint(TinyClassifier(), path)
