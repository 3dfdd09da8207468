"""Training losses of multi-exit models: weighted joint training (PABEE) and DeeBERT's two stages.

* Joint: ``sum_j w_j L_j / sum_j w_j`` over the exits ``j = 1..L`` with ``w_j = j`` (PABEE, Zhou et al.
  2020: deeper exits weigh more), ``w_j = 1``, or user weights. ``L_j`` is cross-entropy (MSE for
  ``num_labels=1``).
* DeeBERT (Xin et al. 2020), ``training="deebert"``: stage 1 (global step < ``stage2_step``) trains the
  final exit and the other tuners on the final exit's loss; stage 2 trains only the other exit heads on
  ``sum_{j<L} L_j``, with the encoder run under ``torch.no_grad`` and the final head left out: the base,
  the tuners and the final head get no gradient, so an optimizer step leaves them unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.early_exit.engine import hidden_states
from lightning_peft.tuners.early_exit import EarlyExitConfig, find_exit_heads

__all__ = ["deebert_stage", "exit_losses", "exit_weights", "training_loss"]


def exit_weights(spec: str | list[float], num_layers: int) -> Tensor:
    """Normalised loss weights ``(L,)`` (they sum to 1): ``"pabee"`` ``j / sum j``, ``"equal"`` ``1/L``,
    or the given weights divided by their sum."""
    if spec == "pabee":
        w = torch.arange(1, num_layers + 1, dtype=torch.float32)
    elif spec == "equal":
        w = torch.ones(num_layers)
    else:
        if len(spec) != num_layers:
            raise ValueError(f"loss_weights has {len(spec)} values for {num_layers} exits")
        w = torch.tensor(spec, dtype=torch.float32)
    return w / w.sum()


def exit_losses(all_logits: Tensor, labels: Tensor) -> Tensor:
    """Loss of every exit ``(L,)`` for logits ``(L, B, C)``: cross-entropy, or MSE when ``C == 1``."""
    L, B, C = all_logits.shape
    if C == 1:
        per = F.mse_loss(all_logits[..., 0], labels.to(all_logits.dtype).expand(L, B), reduction="none")
        return per.mean(1)
    if labels.numel() and (int(labels.max()) >= C or int(labels.min()) < 0):
        raise ValueError(
            f"labels range over [{int(labels.min())}, {int(labels.max())}] but the exit heads have "
            f"num_labels={C}; "
            "set EarlyExitConfig(num_labels=...) to the task's number of classes"
        )
    flat = F.cross_entropy(all_logits.reshape(L * B, C), labels.repeat(L), reduction="none")
    return flat.view(L, B).mean(1)


def deebert_stage(config: EarlyExitConfig, global_step: int) -> int:
    """DeeBERT's stage (1 or 2) at ``global_step`` (0 for joint training)."""
    if config.training != "deebert":
        return 0
    assert config.stage2_step is not None
    return 1 if global_step < config.stage2_step else 2


def training_loss(
    model: nn.Module, labels: Tensor, *, global_step: int = 0, **batch: Any
) -> tuple[Tensor, Tensor]:
    """The training loss of the injected config and the exit logits it was computed from.

    Args:
        model: a model with exit heads (and possibly other tuners).
        labels: ``(B,)`` class ids (float targets for regression).
        global_step: the optimizer step, for DeeBERT's schedule.
        **batch: the model inputs.

    Returns:
        ``(loss, logits)``: ``logits`` is ``(L, B, C)`` for joint training and DeeBERT's stage 2
        (``L - 1`` exits there), ``(1, B, C)`` (the final exit) in DeeBERT's stage 1.
    """
    heads = find_exit_heads(model)
    cfg = heads.config
    stage = deebert_stage(cfg, global_step)
    if stage == 2:
        with torch.no_grad():
            hidden, mask = hidden_states(model, **batch)
        logits = torch.stack([heads[j](hidden[j], mask) for j in range(len(heads) - 1)])
        return exit_losses(logits, labels).sum(), logits
    hidden, mask = hidden_states(model, **batch)
    if stage == 1:
        logits = heads[-1](hidden[-1], mask).unsqueeze(0)
        return exit_losses(logits, labels)[0], logits
    logits = torch.stack([head(h, mask) for head, h in zip(heads, hidden, strict=True)])
    weights = exit_weights(cfg.loss_weights, len(heads)).to(logits.device)
    return (weights * exit_losses(logits, labels)).sum(), logits
