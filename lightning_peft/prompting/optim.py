"""AdamW over the parameters trainable now (no weight decay on biases / norms) + linear warmup and decay."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from transformers import get_linear_schedule_with_warmup

__all__ = ["adamw_with_schedule"]


def adamw_with_schedule(
    module: L.LightningModule, learning_rate: float, weight_decay: float, warmup_ratio: float
) -> dict[str, Any]:
    """``configure_optimizers`` output: AdamW + a per-step linear schedule over the trainer's steps.

    Raises:
        RuntimeError: Nothing is trainable.
    """
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    if not decay and not no_decay:
        raise RuntimeError(f"{type(module).__name__} has no parameter with requires_grad=True to optimise")
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate)
    total = max(int(module.trainer.estimated_stepping_batches), 1)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total), total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
