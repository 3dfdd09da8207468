"""The optimiser every task uses: AdamW over the parameters trainable now, linear warmup then linear decay."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn
from transformers import get_linear_schedule_with_warmup

__all__ = ["adamw_linear_warmup"]


def adamw_linear_warmup(
    module: nn.Module, learning_rate: float, weight_decay: float, warmup_ratio: float, total_steps: int
) -> OptimizerLRSchedulerConfig:
    """AdamW over ``module``'s parameters with ``requires_grad=True`` + a per-step linear warmup/decay.

    Matrices get ``weight_decay``; biases and norm weights (1-D tensors) get none. Only parameters trainable
    when this runs are optimised, so it follows whatever a PEFT callback froze in ``setup``.

    Args:
        module: The LightningModule.
        learning_rate: Peak learning rate.
        weight_decay: Decay of matrices.
        warmup_ratio: Share of ``total_steps`` spent warming up linearly from 0.
        total_steps: Optimizer steps of the whole fit (``trainer.estimated_stepping_batches``).

    Returns:
        Lightning's optimizer + step-interval scheduler dict.

    Raises:
        RuntimeError: Nothing is trainable.
    """
    decay, no_decay = [], []
    for param in module.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise RuntimeError(f"{type(module).__name__} has no parameter with requires_grad=True to optimise")
    groups = [
        {"params": params, "weight_decay": wd}
        for params, wd in ((decay, weight_decay), (no_decay, 0.0))
        if params
    ]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate)
    total = max(int(total_steps), 1)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total), total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
