"""Where a resumed run started: a callback that checks it before the first resumed step trains.

A resume test that only compares the end of a resumed run with an uninterrupted one cannot tell a resume
from a restart: a run given no checkpoint at all trains the same steps from the same seed and ends
bitwise equal. :class:`ResumeProbe` closes that hole. It reads the checkpoint file when it is created
(before the resumed run can overwrite it) and, at the first ``on_train_batch_start`` of the resumed run,
asserts that

* ``trainer.global_step`` equals the checkpoint's ``global_step`` and the step the test expects;
* ``trainer.current_epoch`` and the batch index within the epoch are the ones the test expects;
* every tensor the checkpoint holds (the adapters, saved heads, buffers) equals the module's tensor of
  the same name, bitwise, before anything has trained.

Use it through the ``assert_resumed_from`` fixture (``tests/conftest.py``), which also fails a test whose
probe never saw a training batch (the probe was not passed to the Trainer, or nothing was left to train).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch


class ResumeProbe(L.Callback):
    """Asserts, at the first training batch of a resumed fit, that it starts where ``ckpt_path`` left off.

    Args:
        ckpt_path: The checkpoint the run resumes from (read now, so a later overwrite does not matter).
        global_step: The optimizer step the test expects the checkpoint to hold and the run to start at.
        epoch: The epoch the first resumed batch belongs to.
        batch: That batch's index within its epoch (0 when the checkpoint was written at an epoch end).
    """

    def __init__(self, ckpt_path: str | Path, *, global_step: int, epoch: int, batch: int) -> None:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == global_step, (
            f"the checkpoint holds global_step {checkpoint['global_step']}, the test expects {global_step}"
        )
        self.saved: dict[str, torch.Tensor] = {
            k: v for k, v in checkpoint["state_dict"].items() if isinstance(v, torch.Tensor)
        }
        assert self.saved, f"{ckpt_path} holds no tensors to compare"
        self.expected = {"global_step": global_step, "epoch": epoch, "batch": batch}
        self.fired = False

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.fired:
            return
        self.fired = True
        started = {"global_step": trainer.global_step, "epoch": trainer.current_epoch, "batch": batch_idx}
        assert started == self.expected, f"the resumed run started at {started}, expected {self.expected}"
        current = pl_module.state_dict()
        missing = sorted(set(self.saved) - set(current))
        assert not missing, f"checkpoint tensors absent from the module: {missing}"
        differ = [k for k, v in self.saved.items() if not torch.equal(current[k].cpu(), v)]
        assert not differ, f"tensors not restored from the checkpoint before training: {differ}"


# The type of the ``assert_resumed_from`` fixture (tests/conftest.py).
ResumedFrom = Callable[..., ResumeProbe]
