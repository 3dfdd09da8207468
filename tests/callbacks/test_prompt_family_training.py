"""Prompt, P-tuning, prefix, parallel-adapter and MAM tuners in real Trainer runs with the PEFT callback:
the base stays frozen, checkpoints hold adapters only, and resuming equals an uninterrupted run bitwise."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.callbacks.adapter_checkpoint import META_KEY
from lightning_peft.tuners.prefix import PrefixTuningConfig
from lightning_peft.tuners.prompt import PromptTuningConfig
from lightning_peft.tuners.ptuning import PTuningConfig
from lightning_peft.tuners.unified import UnifiedConfig
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer
from tests.resume import ResumedFrom

CONFIGS = {
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3, modules_to_save=["classifier"]),
    "ptuning": lambda: PTuningConfig(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3, projection=True, encoder_hidden_size=8),
    "parallel": lambda: UnifiedConfig(preset="scaled_parallel", modules_to_save=["classifier"]),
    "mam": lambda: UnifiedConfig(
        points=[
            {
                "form": "prefix",
                "at": "attention_heads",
                "insertion": "parallel",
                "composition": "gated_add",
                "bottleneck_size": 3,
            },
            {
                "form": "bottleneck",
                "at": "ffn",
                "insertion": "parallel",
                "composition": "scaled_add",
                "scale": 4.0,
                "bottleneck_size": 8,
            },
        ]
    ),
}


class _Snapshot(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _run(
    root: Path, method: str, epochs: int, ckpt_path: str | None = None, probe: L.Callback | None = None
) -> TinyClassifier:
    L.seed_everything(7)
    module, snap = TinyClassifier(), _Snapshot()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)
    loader = tiny_loader(n=24)
    callbacks = [PEFT(CONFIGS[method]()), ckpt, snap, *([probe] if probe else [])]
    trainer(root, callbacks, max_epochs=epochs).fit(module, loader, ckpt_path=ckpt_path)
    module.snapshot = snap.before  # type: ignore[attr-defined]
    return module


@pytest.mark.parametrize("method", list(CONFIGS))
def test_adapter_only_checkpoint_and_exact_resume(
    tmp_path: Path, method: str, assert_resumed_from: ResumedFrom
) -> None:
    full = _run(tmp_path / "a", method, epochs=2)
    trainable = set(lp.trainable_state_dict(full))
    changed = {n for n, p in full.named_parameters() if not torch.equal(p, full.snapshot[n])}
    assert changed == trainable  # the base stayed frozen, every tuner tensor trained

    _run(tmp_path / "b", method, epochs=1)
    saved = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=False)
    assert set(saved["state_dict"]) - {META_KEY} == trainable
    assert saved[META_KEY]["config"]["method"] == CONFIGS[method]().method
    path = tmp_path / "b" / "ckpt" / "last.ckpt"
    probe = assert_resumed_from(path, global_step=3, epoch=1, batch=0)  # 3 batches per epoch
    resumed = _run(tmp_path / "b", method, epochs=2, ckpt_path=str(path), probe=probe)
    a, b = lp.trainable_state_dict(full), lp.trainable_state_dict(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
