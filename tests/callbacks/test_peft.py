"""The PEFT callback in real Trainer runs: adapter-only checkpoints, exact resume, refusals."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft.callbacks import PEFT, AdapterCheckpointError
from lightning_peft.callbacks.adapter_checkpoint import META_KEY
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer
from tests.resume import ResumedFrom


def lora(**kw) -> lp.LoRAConfig:
    return lp.LoRAConfig(
        r=4, alpha=8, dropout=0.1, target_modules=["query", "value"], modules_to_save=["classifier"], **kw
    )


def _adapter_keys(module: L.LightningModule) -> set[str]:
    return set(lp.trainable_state_dict(module))


@pytest.mark.parametrize("weights_only", [False, True])
def test_checkpoints_hold_adapters_only(tmp_path: Path, weights_only: bool) -> None:
    module = TinyClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_weights_only=weights_only)
    trainer(tmp_path, [PEFT(lora()), ckpt]).fit(module, tiny_loader())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    keys = set(saved["state_dict"]) - {META_KEY}
    assert keys == _adapter_keys(module)
    assert all("lora_" in k or k.startswith("classifier.") for k in keys)
    assert saved[META_KEY]["config"]["method"] == "lora"
    assert all(isinstance(v, torch.Tensor) for v in saved["state_dict"].values()), "state_dict: tensors only"
    assert ("optimizer_states" in saved) is not weights_only
    # The user's own state_dict() stays complete.
    assert len(module.state_dict()) > len(keys)


class _Snapshot(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize(
    "config",
    [lp.BottleneckConfig(style="pfeiffer"), lp.BitFitConfig(exclude_modules=["pooler.dense"]), lora()],
    ids=["pfeiffer", "bitfit", "lora"],
)
def test_frozen_base_and_trained_adapters(tmp_path: Path, config: lp.TunerConfig) -> None:
    module, snap = TinyClassifier(), _Snapshot()
    trainer(tmp_path, [PEFT(config, check_gradients=True), snap], max_steps=4).fit(module, tiny_loader())
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, snap.before[n])}
    assert changed == _adapter_keys(module)


def _run(
    tmp_path: Path, epochs: int, ckpt_path: str | None = None, probe: L.Callback | None = None
) -> TinyClassifier:
    L.seed_everything(7)
    module = TinyClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    callbacks = [PEFT(lora()), ckpt, *([probe] if probe else [])]
    trainer(tmp_path, callbacks, max_epochs=epochs).fit(module, tiny_loader(), ckpt_path=ckpt_path)
    return module


def test_resume_equals_uninterrupted_run_bitwise(tmp_path: Path, assert_resumed_from: ResumedFrom) -> None:
    full = _run(tmp_path / "a", epochs=3)
    _run(tmp_path / "b", epochs=1)
    path = tmp_path / "b" / "ckpt" / "last.ckpt"
    probe = assert_resumed_from(path, global_step=6, epoch=1, batch=0)  # 6 batches per epoch
    resumed = _run(tmp_path / "b", epochs=3, ckpt_path=str(path), probe=probe)
    a, b = lp.trainable_state_dict(full), lp.trainable_state_dict(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_restores_adapters_before_training(tmp_path: Path) -> None:
    trained = _run(tmp_path, epochs=1)
    path = tmp_path / "ckpt" / "last.ckpt"
    module = TinyClassifier()
    trainer(tmp_path, [PEFT(lora())], max_epochs=1).validate(
        module, tiny_loader(), ckpt_path=str(path), verbose=False
    )
    for k, v in lp.trainable_state_dict(trained).items():
        assert torch.equal(lp.trainable_state_dict(module)[k], v), k


def test_wrong_base_model_is_refused(tmp_path: Path) -> None:
    _run(tmp_path, epochs=1)
    other = TinyClassifier(seed=3)  # same architecture, different "pretrained" weights
    with pytest.raises(AdapterCheckpointError, match=r"(?s)different base model.*different values"):
        trainer(tmp_path, [PEFT(lora())]).fit(
            other, tiny_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )


def test_different_config_is_refused(tmp_path: Path) -> None:
    _run(tmp_path, epochs=1)
    other = lp.LoRAConfig(
        r=8, alpha=8, dropout=0.1, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    with pytest.raises(AdapterCheckpointError, match="r: 4 vs 8"):
        trainer(tmp_path, [PEFT(other)]).fit(
            TinyClassifier(), tiny_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )


def test_missing_adapter_key_is_refused(tmp_path: Path) -> None:
    _run(tmp_path, epochs=1)
    path = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(path, weights_only=False)
    dropped = next(k for k in ckpt["state_dict"] if "lora_B" in k)
    del ckpt["state_dict"][dropped]
    torch.save(ckpt, path)
    with pytest.raises(AdapterCheckpointError, match="lacks 1 adapter tensor"):
        trainer(tmp_path, [PEFT(lora())]).fit(TinyClassifier(), tiny_loader(), ckpt_path=str(path))


def test_checkpoint_without_the_callback_fails_loudly(tmp_path: Path) -> None:
    _run(tmp_path, epochs=1)
    with pytest.raises(RuntimeError, match=r"Missing key|Unexpected key"):
        trainer(tmp_path, []).fit(
            TinyClassifier(), tiny_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )


def test_model_built_in_configure_model_is_injected_before_optimizers(tmp_path: Path) -> None:
    module = TinyClassifier(build_in_configure_model=True)
    trainer(tmp_path, [PEFT(lora())], max_steps=2).fit(module, tiny_loader())
    assert lp.get_config(module) is not None
    assert {n for n, p in module.named_parameters() if p.requires_grad} == _adapter_keys(module)


class _AllParamsOptimizer(TinyClassifier):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _StaleOptimizer(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.frozen_params = list(self.parameters())  # captured before PEFT injected anything

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.frozen_params, lr=0.1)


def test_optimizer_with_frozen_params_warns(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="frozen parameter"):
        trainer(tmp_path, [PEFT(lora())], max_steps=1).fit(_AllParamsOptimizer(), tiny_loader())


def test_optimizer_missing_adapters_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"does not hold .* trainable adapter"):
        trainer(tmp_path, [PEFT(lora())], max_steps=1).fit(_StaleOptimizer(), tiny_loader())


def test_unused_trainable_parameter_is_reported(tmp_path: Path) -> None:
    config = lp.LoRAConfig(r=2, target_modules=["query", "pooler.dense"])  # the forward never runs the pooler
    with pytest.raises(RuntimeError, match=r"pooler.dense.lora_"):
        trainer(tmp_path, [PEFT(config, check_gradients=True)], max_steps=1).fit(
            TinyClassifier(), tiny_loader()
        )


def test_config_from_a_dict() -> None:
    cb = PEFT({"method": "lora", "r": 2, "target_modules": ["query"]})
    assert isinstance(cb.config, lp.LoRAConfig) and cb.config.r == 2
    with pytest.raises(ValueError, match=r"(?s)unknown field.*rank"):
        PEFT({"method": "lora", "rank": 2})


@pytest.mark.parametrize(
    ("variant", "options", "config"),
    [
        ("linformer", {"proj_dim": 4}, lora()),
        (
            "sliding_window",
            {"window": 4},
            lp.BottleneckConfig(style="houlsby", modules_to_save=["classifier"]),
        ),
        ("performer", {"nb_features": 8}, lp.BitFitConfig(exclude_modules=["pooler.dense"])),
    ],
    ids=["linformer+lora", "window+houlsby", "performer+bitfit"],
)
def test_attention_swap_combines_with_every_tuner(
    tmp_path: Path, variant: str, options: dict, config: lp.TunerConfig
) -> None:
    from lightning_peft.callbacks import AttentionSwap

    module, snap = TinyClassifier(), _Snapshot()
    swap = AttentionSwap(variant, target="backbone", options=options)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, [swap, PEFT(config), snap, ckpt], max_steps=3).fit(module, tiny_loader())
    trainable = _adapter_keys(module)
    # Variants with learned parameters (Linformer's projections) train next to the tuner.
    assert any("attention_variant" in k for k in trainable) == (variant == "linformer")
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, snap.before[n])}
    assert changed == trainable
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(saved["state_dict"]) - {META_KEY} == trainable
