"""LastCheckpoint: ``last.ckpt`` every N steps, on time even beside a monitored checkpoint, and at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_peft.tasks import LastCheckpoint, TextClassificationData, TextClassifier
from tests.tasks.helpers import TINY_VOCAB


class SavedSteps(Callback):
    """Records the global step held by ``last.ckpt`` after every training batch."""

    def __init__(self, path: Path) -> None:
        self.path, self.steps = path, []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = torch.load(self.path, weights_only=False)["global_step"] if self.path.exists() else None
        self.steps.append(step)


def test_saves_every_n_steps_beside_a_monitored_checkpoint_and_the_final_step(
    tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    data = TextClassificationData(tokenizer="whitespace", vocab_size=TINY_VOCAB, batch_size=16, max_length=16)
    model = TextClassifier(config=tiny_config, num_labels=data.num_labels)
    last = LastCheckpoint(tmp_path / "ckpt", every_n_train_steps=3)
    best = ModelCheckpoint(tmp_path / "ckpt", monitor="val/acc", mode="max")  # validation at epoch end only
    saved = SavedSteps(tmp_path / "ckpt" / "last.ckpt")
    trainer = L.Trainer(
        max_steps=7,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[last, best, saved],
    )
    trainer.fit(model, data)
    # Saved on time mid-epoch although the monitored metric does not exist yet, then at the end of fit.
    # Lightning runs checkpoint callbacks last, so entry k is what last.ckpt held before batch k's save.
    assert saved.steps == [None, None, None, 3, 3, 3, 6]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["global_step"] == 7
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]  # no validation ran yet


def test_every_n_train_steps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every_n_train_steps must be >= 1; got 0"):
        LastCheckpoint(every_n_train_steps=0)
