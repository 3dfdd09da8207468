"""PET ensembles, distillation and iPET's training-set growth (Schick & Schütze 2021, EACL and NAACL).

* Ensemble: the soft label of an unlabeled example is the mean of the raw class scores (logits) of the
  pattern models, optionally weighted by each model's accuracy on the training set before training
  (PET's ``"wmean"``): ``t = sum_i w_i s_i / sum_i w_i``.
* Distillation: the final classifier ``s`` learns ``t`` with temperature ``T`` (PET: ``T = 2``):
  ``KL(softmax(t / T) || softmax(s / T)) * T^2``, averaged over the batch; exactly PET's
  ``F.kl_div(log_softmax(s / T), softmax(t / T), reduction="sum") * T^2 / B``.
* iPET: in each generation model ``i`` is retrained on the labeled set plus unlabeled examples labeled by a
  random 25% of the *other* models (at least one); the added set grows so that the training set is
  ``|T| * 5^g`` after generation ``g``, split over classes as in the labeled set, and within a class the
  examples are drawn without replacement with probability proportional to the subset ensemble's
  confidence (its largest softmax probability), as PET's ``_draw_examples_by_label_probability``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "distillation_loss",
    "ensemble_logits",
    "ipet_class_counts",
    "ipet_draw",
    "ipet_subset",
]


def ensemble_logits(logits: Sequence[Tensor] | Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """Weighted mean of ``k`` models' ``(N, C)`` raw logits -> ``(N, C)``.

    Raises:
        ValueError: No models, mismatched shapes, or weights that are negative / all zero / miscounted.
    """
    stack = torch.stack(list(logits)) if not isinstance(logits, Tensor) else logits  # (k, N, C)
    if stack.ndim != 3 or stack.shape[0] == 0:
        raise ValueError(f"need k >= 1 logit tables of shape (N, C); got {tuple(stack.shape)}")
    if stack.shape[1] == 0:
        raise ValueError("the unlabeled set is empty: nothing to label")
    if weights is None:
        return stack.mean(0)
    w = torch.tensor(list(weights), dtype=stack.dtype)
    if w.numel() != stack.shape[0] or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"need {stack.shape[0]} non-negative weights, not all zero; got {list(weights)}")
    return torch.einsum("k,knc->nc", w / w.sum(), stack)


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 2.0) -> Tensor:
    """``KL(softmax(t/T) || softmax(s/T)) * T^2`` averaged over the batch (PET's distillation loss).

    Args:
        student: ``(B, C)`` the student's logits ``s``.
        teacher: ``(B, C)`` the ensemble's logits ``t``.
        temperature: ``T``.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} logits differ")
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    q = F.softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_p, q, reduction="sum") * temperature**2 / student.shape[0]


def ipet_subset(model: int, num_models: int, rng: np.random.Generator, share: float = 0.25) -> list[int]:
    """The other models that label data for ``model``: a random ``share`` of them, at least one."""
    others = [j for j in range(num_models) if j != model]
    if not others:
        raise ValueError("iPET needs at least 2 models (patterns)")
    size = max(1, round(share * len(others)))
    return sorted(int(j) for j in rng.choice(others, size=size, replace=False))


def ipet_class_counts(
    labels: Sequence[int], num_labels: int, generation: int, scale: float = 5.0
) -> list[int]:
    """Examples to add per class so the set grows to ``|T| * scale^(generation + 1)`` (T's class shares)."""
    base = len(labels)
    if base == 0:
        raise ValueError("iPET needs a non-empty labeled set")
    total = int(base * scale ** (generation + 1)) - base
    prior = np.bincount(np.asarray(labels), minlength=num_labels) / base
    return [round(total * p) for p in prior]


def ipet_draw(logits: Tensor, counts: Sequence[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Draw unlabeled examples per predicted class, weighted by confidence, without replacement.

    Args:
        logits: ``(N, C)`` the labeling subset's ensemble logits on the unlabeled set.
        counts: How many to draw per class (fewer when a class has fewer predicted examples).
        rng: The generator.

    Returns:
        Indices into the unlabeled set and their labels (the argmax).
    """
    if logits.shape[0] == 0:
        raise ValueError("the unlabeled set is empty: iPET has nothing to label")
    probs = torch.softmax(logits.double(), -1).numpy()
    labels = probs.argmax(1)
    chosen: list[int] = []
    chosen_labels: list[int] = []
    for c, n in enumerate(counts):
        pool = np.flatnonzero(labels == c)
        n = min(n, len(pool))
        if n <= 0:
            continue
        conf = probs[pool].max(1)
        picked = rng.choice(pool, size=n, replace=False, p=conf / conf.sum())
        chosen += [int(i) for i in picked]
        chosen_labels += [c] * n
    return chosen, chosen_labels
