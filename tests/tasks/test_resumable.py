"""A run killed mid-epoch and resumed from its last checkpoint equals an uninterrupted run, bitwise."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.tasks import TextClassificationData, TextClassifier
from tests.resume import ResumedFrom

TINY = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 256,
}
WORDS = ["good", "bad", "fine", "awful", "great", "poor", "the", "a", "movie", "phone", "was", "is"]


class Crash(L.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")  # dies like a killed job: nothing more is written


def _csv(path: Path, n: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for _ in range(n):
            idx = torch.randint(0, len(WORDS), (6,), generator=g).tolist()
            text = " ".join(WORDS[i] for i in idx)
            w.writerow([text, "pos" if ("good" in text or "great" in text) else "neg"])
    return path


def _fit(
    root: Path, data_dir: Path, crash_at: int | None, ckpt_path: str | None, probe: L.Callback | None = None
) -> TextClassifier:
    L.seed_everything(3)
    model = TextClassifier(config=TINY, learning_rate=1e-2, dropout=0.1)
    data = TextClassificationData(
        str(data_dir / "train.csv"),
        str(data_dir / "val.csv"),
        tokenizer="whitespace",
        vocab_size=256,
        batch_size=8,
    )
    callbacks: list = [
        PEFT(
            lp.LoRAConfig(r=2, dropout=0.1, target_modules=["query", "value"], modules_to_save=["classifier"])
        ),
        ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=3, save_last=True, save_top_k=0),
    ]
    if crash_at is not None:
        callbacks.append(Crash(crash_at))
    if probe is not None:
        callbacks.append(probe)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=14,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root),
        callbacks=callbacks,
        deterministic=True,
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("crash_at", [4, 10], ids=["epoch0", "epoch1"])
def test_killed_mid_epoch_resumes_exactly(
    tmp_path: Path, crash_at: int, assert_resumed_from: ResumedFrom
) -> None:
    _csv(tmp_path / "train.csv", 64, seed=0)  # 8 batches per epoch: both crashes are mid-epoch
    _csv(tmp_path / "val.csv", 16, seed=1)
    full = _fit(tmp_path / "full", tmp_path, None, None)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "run", tmp_path, crash_at, None)
    path = tmp_path / "run/ckpt/last.ckpt"
    step = crash_at - crash_at % 3  # checkpoints every 3 steps: 3 or 9, both mid-epoch
    # The first resumed batch is the one after the checkpoint: epoch 0 batch 3, or epoch 1 batch 1.
    probe = assert_resumed_from(path, global_step=step, epoch=step // 8, batch=step % 8)
    resumed = _fit(tmp_path / "run", tmp_path, None, str(path), probe)
    a, b = lp.trainable_state_dict(full), lp.trainable_state_dict(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
