"""AdapterFusion as a Lightning workflow: stage-1 runs train task adapters, stage 2 loads them by path and
trains only the fusion (and the head); adapter-only checkpoints, exact resume, the recipes end to end."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft import named
from lightning_peft.callbacks import PEFT
from lightning_peft.callbacks.adapter_checkpoint import META_KEY
from lightning_peft.tuners.fusion import AdapterFusion, FusionConfig, fusion_weights, plot_fusion_weights
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer
from tests.resume import ResumedFrom

CONFIGS = Path(__file__).parents[2] / "configs"


def _stage1(tmp_path: Path, task: str, data_seed: int) -> Path:
    L.seed_everything(data_seed)
    config = lp.BottleneckConfig(style="pfeiffer", modules_to_save=["classifier"])
    ckpt = ModelCheckpoint(dirpath=tmp_path / task, save_last=True, save_top_k=0)
    trainer(tmp_path / task, [PEFT(config), ckpt], max_steps=4).fit(
        TinyClassifier(), tiny_loader(seed=data_seed)
    )
    return tmp_path / task / "last.ckpt"


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stage1")
    return {"task_a": str(_stage1(root, "task_a", 1)), "task_b": str(_stage1(root, "task_b", 2))}


class _Snapshot(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _fusion_config(stage1: dict[str, str]) -> FusionConfig:
    return FusionConfig(adapters=stage1, modules_to_save=["classifier"])


def _stage2(
    root: Path,
    stage1: dict[str, str],
    epochs: int,
    ckpt_path: str | None = None,
    probe: L.Callback | None = None,
) -> TinyClassifier:
    L.seed_everything(3)
    module = TinyClassifier()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)
    callbacks = [PEFT(_fusion_config(stage1)), ckpt, *([probe] if probe else [])]
    trainer(root, callbacks, max_epochs=epochs).fit(module, tiny_loader(seed=3), ckpt_path=ckpt_path)
    return module


def test_stage_two_trains_only_the_fusion_and_saves_only_it(tmp_path: Path, stage1: dict[str, str]) -> None:
    module, snap = TinyClassifier(), _Snapshot()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    peft = PEFT(_fusion_config(stage1), check_gradients=True)
    trainer(tmp_path, [peft, snap, ckpt], max_steps=4).fit(module, tiny_loader(seed=3))

    changed = {n for n, p in module.named_parameters() if not torch.equal(p, snap.before[n])}
    trainable = set(lp.trainable_state_dict(module))
    assert changed == trainable
    assert all(".fusion." in k or k.startswith("classifier.") for k in trainable)
    # The stage-1 adapters arrived from their checkpoints and stayed frozen.
    for task, path in stage1.items():
        saved = torch.load(path, weights_only=False)["state_dict"]
        for key, value in named.adapter_state_dict(module, task).items():
            assert torch.equal(value, saved[key]), key
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == trainable
    assert checkpoint[META_KEY]["config"]["method"] == "fusion"

    module.eval()
    fusion_weights(module, reset=True)
    with torch.no_grad():
        module(next(iter(tiny_loader(seed=4)))[0])
    weights = fusion_weights(module)
    assert len(weights) == 2 and all(set(w) == {"task_a", "task_b"} for w in weights.values())
    png = plot_fusion_weights(weights, tmp_path / "fusion_weights.png")
    assert png.stat().st_size > 1000


def test_stage_two_resume_equals_an_uninterrupted_run(
    tmp_path: Path, stage1: dict[str, str], assert_resumed_from: ResumedFrom
) -> None:
    full = _stage2(tmp_path / "a", stage1, epochs=2)
    _stage2(tmp_path / "b", stage1, epochs=1)
    path = tmp_path / "b" / "ckpt" / "last.ckpt"
    probe = assert_resumed_from(path, global_step=6, epoch=1, batch=0)  # 6 batches per epoch
    resumed = _stage2(tmp_path / "b", stage1, epochs=2, ckpt_path=str(path), probe=probe)
    a, b = lp.trainable_state_dict(full), lp.trainable_state_dict(resumed)
    assert a.keys() == b.keys() and any(isinstance(m, AdapterFusion) for m in resumed.modules())
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_fusion_recipes_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_peft.cli import main

    monkeypatch.chdir(tmp_path)
    for stage in ("stage1_a", "stage1_b", "stage2"):
        main(["fit", "--config", str(CONFIGS / f"tiny_fusion_{stage}.yaml"), "--trainer.max_steps", "2"])
    saved = torch.load(tmp_path / "outputs/tiny_fusion_stage2/checkpoints/last.ckpt", weights_only=False)
    keys = set(saved["state_dict"]) - {META_KEY}
    assert keys and all(".fusion." in k or k.startswith("classifier.") for k in keys)
