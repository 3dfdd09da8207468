"""`LastCheckpoint`: an unmonitored ``last.ckpt`` written every N training steps and at the end of fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

__all__ = ["LastCheckpoint"]


class LastCheckpoint(ModelCheckpoint):
    """Keep one ``last.ckpt``: rewritten every ``every_n_train_steps`` and once more when ``fit`` ends.

    Lightning's ``ModelCheckpoint`` leaves two gaps that lose training after a crash or at the end of a run:

    - With ``monitor`` set and validation only at epoch end, step-triggered saves wait for the validation
      metric, so a run killed mid-epoch loses the whole epoch. This callback never monitors anything, so its
      step saves happen on time; keep a separate monitored ``ModelCheckpoint`` for the best model.
    - ``save_last`` writes at the end of fit only if no ``last.ckpt`` was written before, so the steps after
      the last periodic save are never saved. This callback writes ``last.ckpt`` at the end of fit whenever
      the final step is not saved yet, so ``last.ckpt`` is the model that training ended with.

    Example::

        trainer = L.Trainer(callbacks=[PEFT(config), LastCheckpoint("checkpoints", every_n_train_steps=50),
                                       ModelCheckpoint("checkpoints", monitor="val/acc", mode="max")])
        trainer.fit(module, data)                     # killed? rerun with ckpt_path="last"

    Args:
        dirpath: Folder of ``last.ckpt`` (Lightning's default folder when ``None``).
        every_n_train_steps: Save every this many optimizer steps (>= 1).
    """

    def __init__(self, dirpath: str | Path | None = None, every_n_train_steps: int = 50) -> None:
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1; got {every_n_train_steps}")
        super().__init__(
            dirpath=dirpath,
            monitor=None,
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save ``last.ckpt`` unless the final step is saved already."""
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
