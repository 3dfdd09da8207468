"""Rank classification over answer choices (T0 / promptsource style, Sanh et al. 2022).

A task is a template whose answer is a continuation (``"{premise} Question: {hypothesis}? {answer}"``) and a
list of answer choices, fixed per task (``["yes", "maybe", "no"]``) or given per example (a list in the
example: the number of choices may differ from example to example, unlike T0's evaluation code which
assumes one count per batch). Each choice is scored by its whole-answer log-likelihood
``sum_i log p(a_i | prompt, a_<i)`` (``length_normalize``: divided by its token count), and the prediction is
the highest-scoring choice. Training (multi-task) maximises the likelihood of the correct answer's tokens.

Every (example, choice) pair is one row of a right-padded batch; rows are regrouped per example after the
forward, so mixed choice counts cost nothing extra.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.prompting.template import Template
from lightning_peft.prompting.tokens import encode_piece, lm_kind

__all__ = ["TaskPrompt", "answer_loglik", "choice_scores", "rank_classify"]


@dataclass
class TaskPrompt:
    """A task of a multi-task mixture.

    Attributes:
        name: Task name.
        template: A pattern ending in ``{answer}``.
        choices: Answer choices by label id (``None``: each example carries ``example["choices"]``).
    """

    name: str
    template: str
    choices: list[str] | None = None

    def __post_init__(self) -> None:
        self.pattern = Template(self.template)
        self.pattern.check_kind("causal")
        if self.choices is not None and len(self.choices) < 2:
            raise ValueError(f"task {self.name!r}: give at least 2 answer choices; got {self.choices}")

    def choices_for(self, example: Mapping[str, Any]) -> list[str]:
        """The example's answer choices."""
        choices = self.choices if self.choices is not None else example.get("choices")
        if not choices or len(choices) < 2:
            raise ValueError(f"task {self.name!r}: an example needs >= 2 answer choices; got {choices}")
        return [str(c) for c in choices]


def answer_loglik(
    model: nn.Module, tokenizer: Any, prompts: Sequence[list[int]], answers: Sequence[list[int]]
) -> Tensor:
    """``(R,)`` summed log-probabilities of each answer's tokens after its prompt (teacher forcing).

    Raises:
        ValueError: An empty answer, or a masked LM (rank classification needs a causal LM).
    """
    if lm_kind(model) != "causal":
        raise ValueError("rank classification scores continuations: it needs a causal LM (GPT-2 / Llama)")
    if any(not a for a in answers):
        raise ValueError("an answer choice encodes to no token")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else 0
    rows = [list(p) + list(a) for p, a in zip(prompts, answers, strict=True)]
    longest = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows])
    logits = model(input_ids=ids.to(_device(model)), attention_mask=mask.to(_device(model))).logits
    offset = logits.shape[1] - ids.shape[1]  # virtual tokens of prompt tuning
    logp = logits[:, offset:-1].float().log_softmax(-1)  # (R, T - 1, V): predicts tokens 1..T-1
    next_ids = ids[:, 1:].to(logp.device)
    token_lp = logp.gather(2, next_ids.unsqueeze(-1)).squeeze(-1)  # (R, T - 1)
    is_answer = torch.zeros_like(token_lp, dtype=torch.bool)
    for r, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        is_answer[r, len(p) - 1 : len(p) - 1 + len(a)] = True
    return (token_lp * is_answer).sum(1)


def choice_scores(
    model: nn.Module,
    tokenizer: Any,
    task: TaskPrompt,
    examples: Sequence[Mapping[str, Any]],
    length_normalize: bool = False,
    max_length: int | None = 256,
) -> list[Tensor]:
    """Per example, the ``(n_choices,)`` scores of its answer choices."""
    space = task.pattern.parts[-1].space
    prompts, answers, owner = [], [], []
    for i, ex in enumerate(examples):
        choices = [encode_piece(tokenizer, (" " if space else "") + c) for c in task.choices_for(ex)]
        reserve = max(len(c) for c in choices)
        enc = task.pattern.encode(
            ex["slots"], tokenizer, kind="causal", max_length=max_length, reserve=reserve
        )
        for c in choices:
            prompts.append(enc.input_ids)
            answers.append(c)
            owner.append(i)
    scores = answer_loglik(model, tokenizer, prompts, answers)
    if length_normalize:
        scores = scores / torch.tensor([len(a) for a in answers], device=scores.device)
    owner_t = torch.tensor(owner)
    return [scores[(owner_t == i).to(scores.device)] for i in range(len(examples))]


@torch.no_grad()
def rank_classify(
    model: nn.Module,
    tokenizer: Any,
    task: TaskPrompt,
    examples: Sequence[Mapping[str, Any]],
    length_normalize: bool = False,
    batch_size: int = 16,
) -> list[int]:
    """The index of the best-scoring answer choice of every example (eval mode)."""
    was_training = model.training
    model.eval()
    preds: list[int] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        preds += [int(s.argmax()) for s in choice_scores(model, tokenizer, task, chunk, length_normalize)]
    model.train(was_training)
    return preds


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
