"""Metrics of a causal LM fine-tune: corpus perplexity and token accuracy, and scores of generated answers.

Perplexity is ``exp`` of the token-weighted mean loss over the whole split (sums of losses and token counts
are accumulated and reduced across processes, never a mean of per-batch means). Generated answers are scored
as in SQuAD (Rajpurkar et al., 2016): exact match after normalisation, and F1 over word tokens.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
import torch.nn.functional as F
from torchmetrics import Metric

from lightning_peft.tasks.chat_format import IGNORE_INDEX

__all__ = ["AnswerScores", "TokenStats", "exact_match", "normalize_answer", "shifted_token_loss", "token_f1"]

_WORD_RE = re.compile(r"\w+")


def shifted_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy: position ``t`` predicts label ``t + 1``; ``-100`` labels are skipped.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)``.

    Returns:
        ``(loss, correct)``: per-target losses ``(N,)`` and whether the argmax was right ``(N,)``, over the
        ``N`` labelled targets.
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    picked = logits[:, :-1][keep]  # (N, V)
    wanted = targets[keep]  # (N,)
    loss = F.cross_entropy(picked.float(), wanted, reduction="none")
    return loss, picked.argmax(-1) == wanted


class TokenStats(Metric):
    """Sums of token losses, correct argmax predictions and labelled tokens; ``compute`` gives
    ``{"loss", "ppl", "token_acc"}`` over everything seen."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("loss_sum", "correct", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, correct: torch.Tensor) -> None:
        """Add per-token ``loss`` ``(N,)`` and ``correct`` ``(N,)``."""
        # Reassigned, not updated in place: states made during an inference-mode validation are inference
        # tensors, which the next (training-mode) run could not update in place.
        self.loss_sum = self.loss_sum + loss.detach().double().sum()
        self.correct = self.correct + correct.double().sum()
        self.count = self.count + loss.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        """Token-weighted mean loss, its ``exp``, and token accuracy."""
        count = self.count.clamp(min=1.0)
        mean = self.loss_sum / count
        return {"loss": mean.float(), "ppl": mean.exp().float(), "token_acc": (self.correct / count).float()}


def normalize_answer(text: str) -> str:
    """Lower-case, trim whitespace, surrounding quotes / backticks and a final full stop, collapse spaces."""
    text = " ".join(text.split()).lower()
    return text.strip("`'\" ").rstrip(".").strip("`'\" ")


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 between the bags of lower-cased word tokens (``os.path.join`` -> ``os``, ``path``, ``join``)."""
    pred, ref = _WORD_RE.findall(prediction.lower()), _WORD_RE.findall(reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class AnswerScores(Metric):
    """Mean exact match and token F1 of generated answers (reduced across processes)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("em", "f1", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str]) -> None:
        """Score each prediction against its reference."""
        em = sum(exact_match(p, r) for p, r in zip(predictions, references, strict=True))
        f1 = sum(token_f1(p, r) for p, r in zip(predictions, references, strict=True))
        self.em, self.f1 = self.em + em, self.f1 + f1
        self.count = self.count + len(predictions)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"exact_match", "token_f1"}`` averaged over the scored answers."""
        count = self.count.clamp(min=1.0)
        return {"exact_match": (self.em / count).float(), "token_f1": (self.f1 / count).float()}
