"""Exit criteria, applied one layer at a time to the samples still running.

Every rule reads only the current exit's logits and a small per-sample state, so the samples that leave
can be dropped from the batch between layers: :class:`ExitRule` keeps that state, :meth:`ExitRule.step`
says which samples leave after a layer and with which logits, and :meth:`ExitRule.select` keeps the state
of the survivors. :func:`decide` applies the same rule to precomputed all-exit logits (threshold sweeps,
validation).

* PABEE (Zhou et al. 2020): ``c = c + 1`` if this exit's argmax equals the previous exit's (regression:
  ``|y_i - y_{i-1}| < tau``), else ``0``; leave when ``c == patience``.
* DeeBERT (Xin et al. 2020): leave when ``H(p) < threshold_i``, ``H = -sum p log p`` with ``log p`` from
  ``log_softmax`` (no overflow for logits of any size).
* Shallow-Deep (Kaya et al. 2019): leave when ``max p >= threshold``; a sample no exit took returns the
  most confident exit (SDN) or the last.

The last layer always lets every sample leave. The exit layer reported is the number of blocks the sample
ran (with SDN's fallback that is all of them, even when an earlier exit's logits are returned).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_peft.tuners.early_exit import EarlyExitConfig

__all__ = ["ExitRule", "decide", "entropy"]


def entropy(logits: Tensor) -> Tensor:
    """Prediction entropy ``-(p * log p).sum(-1)`` from ``log_softmax``: ``(..., C)`` -> ``(...)``; finite
    for any finite logits (the ``logsumexp(z) - sum(z e^z) / sum(e^z)`` form overflows above ~88)."""
    logp = F.log_softmax(_at_least_fp32(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _at_least_fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


class ExitRule:
    """Per-sample state of one criterion over a batch that shrinks as samples leave.

    Args:
        config: the criterion and its parameters.
        num_layers: number of exits ``L``.
        batch: batch size at the first layer.
        device: where the state lives.
    """

    def __init__(self, config: EarlyExitConfig, num_layers: int, batch: int, device: torch.device) -> None:
        self.config = config
        self.num_layers = num_layers
        self.thresholds = (
            config.layer_thresholds(num_layers) if config.criterion in ("entropy", "confidence") else None
        )
        self.count = torch.zeros(batch, dtype=torch.long, device=device)  # PABEE's counter
        self.prev: Tensor | None = None  # previous exit's prediction (class ids or regression values)
        self.best_score: Tensor | None = None  # SDN: the highest confidence so far, and its logits
        self.best_logits: Tensor | None = None

    def needs_head(self, layer: int) -> bool:
        """Whether exit ``layer`` (0-based) must be evaluated (a fixed rule needs only its own layer)."""
        if self.config.criterion == "fixed":
            return layer == self.config.exit_layer - 1
        if self.config.criterion == "patience" and self.config.patience == 0:
            return layer == self.num_layers - 1
        return True

    def step(self, logits: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Decide after exit ``layer`` (0-based) for the ``(b, C)`` logits of the samples still running.

        Returns:
            ``(leave (b,) bool, out (b, C))``: who leaves now and the logits each of them returns.
        """
        cfg, last = self.config, layer == self.num_layers - 1
        out = logits
        if cfg.criterion == "fixed":
            leave = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        elif cfg.criterion == "patience":
            leave = self._patience(logits)
        elif cfg.criterion == "entropy":
            assert self.thresholds is not None
            leave = entropy(logits) < self.thresholds[layer]
        else:
            leave, out = self._confidence(logits, layer, last)
        if last:
            leave = torch.ones_like(leave)
        return leave, out

    def _patience(self, logits: Tensor) -> Tensor:
        cfg = self.config
        pred = logits[:, 0] if cfg.num_labels == 1 else logits.argmax(-1)  # (b,)
        if self.prev is not None:
            if cfg.num_labels == 1:
                assert cfg.tau is not None
                agree = (pred - self.prev).abs() < cfg.tau
            else:
                agree = pred == self.prev
            self.count = torch.where(agree, self.count + 1, torch.zeros_like(self.count))
        self.prev = pred
        return self.count >= cfg.patience if cfg.patience > 0 else torch.zeros_like(pred, dtype=torch.bool)

    def _confidence(self, logits: Tensor, layer: int, last: bool) -> tuple[Tensor, Tensor]:
        assert self.thresholds is not None
        score = F.softmax(_at_least_fp32(logits), dim=-1).max(-1).values  # (b,)
        leave = score >= self.thresholds[layer]
        if self.best_score is None or self.best_logits is None:
            self.best_score, self.best_logits = score, logits
        else:
            better = score > self.best_score  # ties keep the earlier exit
            self.best_score = torch.where(better, score, self.best_score)
            self.best_logits = torch.where(better.unsqueeze(-1), logits, self.best_logits)
        if last and self.config.fallback == "most_confident":
            return leave, torch.where(leave.unsqueeze(-1), logits, self.best_logits)
        return leave, logits

    def select(self, keep: Tensor) -> None:
        """Keep the state of the samples at indices ``keep`` (the ones still running)."""
        self.count = self.count.index_select(0, keep)
        for name in ("prev", "best_score", "best_logits"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, keep))


def decide(config: EarlyExitConfig, all_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Apply ``config``'s rule to precomputed exit logits ``(L, B, C)``.

    Returns:
        ``(logits (B, C), exit_layer (B,))`` with ``exit_layer`` in ``1..L`` (blocks run), what
        :func:`lightning_peft.early_exit.predict` returns when it runs the layers itself.
    """
    L, B = all_logits.shape[:2]
    config.check_depth(L)
    rule = ExitRule(config, L, B, all_logits.device)
    out = all_logits.new_zeros(all_logits.shape[1:])
    layer = torch.full((B,), L, dtype=torch.long, device=all_logits.device)
    alive = torch.arange(B, device=all_logits.device)
    for i in range(L):
        if not rule.needs_head(i):
            continue
        leave, chosen = rule.step(all_logits[i].index_select(0, alive), i)
        out[alive[leave]] = chosen[leave]
        layer[alive[leave]] = i + 1
        keep = (~leave).nonzero(as_tuple=True)[0]
        alive = alive.index_select(0, keep)
        rule.select(keep)
        if alive.numel() == 0:
            break
    return out, layer
