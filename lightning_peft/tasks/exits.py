"""Early exit inside :class:`~lightning_peft.tasks.TextClassifier`: training loss and validation metrics.

When the backbone carries exit heads (``PEFT(EarlyExitConfig(...))`` or a stack ending with one), the
classifier trains on the multi-exit loss of the config (PABEE-weighted, equal, user weights or DeeBERT's
two stages by global step) and its validation / test logs, next to ``acc`` / ``f1`` of the dynamic
prediction (each sample at its own exit):

* ``{split}/exit{j}_acc``: the fraction of samples exit ``j`` gets right (every exit, all layers run), and
  ``{split}/dynamic_acc``, the same fraction for the dynamic prediction (``{split}/acc`` is torchmetrics'
  macro-averaged accuracy, as without exits);
* ``{split}/avg_exit_layer`` and ``{split}/layers_fraction``: blocks run per sample, and that over ``L``;
* ``{split}/speedup``: wall-clock time of the model run in full (every block, final exit only) over the
  time of the dynamic prediction (samples removed from the batch as they leave), both measured on the
  same batches in the same process; ``{split}/time_full_s`` and ``{split}/time_dynamic_s`` beside it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.early_exit import (
    decide,
    exit_logits,
    exit_losses,
    exit_weights,
    hidden_states,
    predict,
    training_loss,
)
from lightning_peft.tuners.early_exit import ExitHeads, find_exit_heads

__all__ = [
    "ExitTimer",
    "check_num_labels",
    "exit_eval",
    "exit_heads_of",
    "exit_train_loss",
    "final_exit_logits",
]

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def exit_heads_of(module: nn.Module) -> ExitHeads | None:
    """The exit heads inside ``module``, or None."""
    return next((m for m in module.modules() if isinstance(m, ExitHeads)), None)


def check_num_labels(heads: ExitHeads, num_labels: int) -> None:
    """Refuse exit heads built for another number of classes than the task's."""
    if heads.config.num_labels != num_labels:
        raise ValueError(
            f"EarlyExitConfig(num_labels={heads.config.num_labels}) but the task has "
            f"num_labels={num_labels}; "
            "set both to the task's number of classes"
        )


def _inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: batch[k] for k in _INPUTS if batch.get(k) is not None}


def final_exit_logits(backbone: nn.Module, **inputs: Tensor) -> Tensor:
    """``(B, C)`` logits of the last exit: every block run, as the model in full."""
    hidden, mask = hidden_states(backbone, **inputs)
    return find_exit_heads(backbone)[-1](hidden[-1], mask)


def exit_train_loss(backbone: nn.Module, batch: dict[str, Tensor], global_step: int) -> Tensor:
    """The config's multi-exit training loss on one batch."""
    loss, _ = training_loss(backbone, batch["labels"], global_step=global_step, **_inputs(batch))
    return loss


class ExitTimer:
    """Wall-clock time of the full model and of the dynamic prediction, summed over an epoch."""

    def __init__(self) -> None:
        self.full = 0.0
        self.dynamic = 0.0

    def measure(self, backbone: nn.Module, heads: ExitHeads, inputs: dict[str, Tensor]) -> None:
        full_cfg = replace(heads.config, criterion="fixed", exit_layer=len(heads), threshold=None)
        for attr, cfg in (("full", full_cfg), ("dynamic", None)):
            start = time.perf_counter()
            predict(backbone, cfg, **inputs)
            setattr(self, attr, getattr(self, attr) + time.perf_counter() - start)

    def speedup(self) -> float:
        return self.full / self.dynamic if self.dynamic > 0 else float("nan")


@torch.no_grad()
def exit_eval(
    backbone: nn.Module, heads: ExitHeads, batch: dict[str, Tensor], timer: ExitTimer | None
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``(loss, dynamic logits (B, C), metrics)`` of one evaluation batch.

    The dynamic prediction is the config's rule applied to every exit's logits (what ``predict`` returns,
    tested equal), so one all-exit pass gives every exit's accuracy and the dynamic result.
    """
    inputs, labels = _inputs(batch), batch["labels"]
    all_logits = exit_logits(backbone, **inputs)  # (L, B, C)
    L = all_logits.shape[0]
    weights = exit_weights(heads.config.loss_weights, L).to(all_logits.device)
    loss = (weights * exit_losses(all_logits, labels)).sum()
    logits, layer = decide(heads.config, all_logits)
    metrics: dict[str, Any] = {
        f"exit{j + 1}_acc": (all_logits[j].argmax(-1) == labels).float().mean() for j in range(L)
    }
    metrics["dynamic_acc"] = (logits.argmax(-1) == labels).float().mean()
    metrics["avg_exit_layer"] = layer.float().mean()
    metrics["layers_fraction"] = layer.float().mean() / L
    if timer is not None:
        timer.measure(backbone, heads, inputs)
    return loss, logits, metrics
