"""Automatic label-word search (LM-BFF, Gao et al. 2021, section 5.1).

1. Candidates: for every class ``c``, the ``k`` vocabulary words ``v`` with the largest
   ``sum_{x in D_train^c} log P(answer = v | T(x))``: the LM's own log-probability at the mask (masked LM)
   or of the next token at the answer position (causal LM), summed over the class's training examples.
   Only tokens that are whole words are kept (a word that re-encodes, with the template's leading space,
   to exactly that one token: no ``##`` pieces, punctuation or special tokens).
2. Assignments: every combination of one candidate per class, ranked by zero-shot accuracy on the training
   set; the ``top`` best are kept.
3. Re-ranking: the kept assignments are ordered by accuracy on the few-shot dev set: by zero-shot accuracy
   (cheap: no training), or by any ``rerank(words) -> dev accuracy`` callable, e.g. one that fine-tunes a
   :class:`~lightning_peft.tasks.PromptClassifier` with those words (LM-BFF fine-tunes each of them).

All scores come from one forward per example: the ``(N, V)`` log-probabilities are computed once and every
assignment is scored from them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.prompting.scoring import lm_logits
from lightning_peft.prompting.template import Template
from lightning_peft.prompting.tokens import encode_piece, lm_kind

__all__ = ["LabelSearchResult", "answer_logprobs", "candidate_words", "search_label_words"]

Example = dict[str, Any]


@dataclass
class LabelSearchResult:
    """Candidates per class, the kept assignments with their train / dev accuracies, and the choice."""

    candidates: list[list[str]]
    assignments: list[tuple[str, ...]]
    train_acc: list[float]
    dev_acc: list[float]
    best: tuple[str, ...] = field(default_factory=tuple)

    def verbalizer(self, labels: Sequence[str]) -> dict[str, list[str]]:
        """The chosen words as a verbalizer dict."""
        return {label: [word] for label, word in zip(labels, self.best, strict=True)}


@torch.no_grad()
def answer_logprobs(
    model: nn.Module,
    tokenizer: Any,
    template: Template,
    examples: Sequence[Example],
    batch_size: int = 32,
    max_length: int | None = 128,
) -> Tensor:
    """``(N, V)`` log-probabilities of every vocabulary token at the answer position of each example."""
    kind = lm_kind(model)
    was_training = model.training
    model.eval()
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else 0
    out = []
    for start in range(0, len(examples), batch_size):
        encs = [
            template.encode(
                ex["slots"], tokenizer, kind=kind, max_length=max_length, reserve=int(kind == "causal")
            )
            for ex in examples[start : start + batch_size]
        ]
        longest = max(len(e.input_ids) for e in encs)
        ids = torch.tensor([e.input_ids + [pad] * (longest - len(e.input_ids)) for e in encs])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (longest - len(e.input_ids)) for e in encs])
        logits, offset = lm_logits(model, ids, mask)
        pos = torch.tensor([e.target for e in encs]) + offset - int(kind == "causal")
        out.append(logits[torch.arange(len(encs)), pos].float().log_softmax(-1))
    model.train(was_training)
    return torch.cat(out)


def candidate_words(
    logprobs: Tensor, labels: Sequence[int], num_labels: int, tokenizer: Any, k: int = 5, space: bool = True
) -> list[list[str]]:
    """Per class, the ``k`` whole-word tokens with the largest summed log-probability over its examples.

    Raises:
        ValueError: A class has no examples.
    """
    y = torch.tensor(list(labels))
    out = []
    for c in range(num_labels):
        if not bool((y == c).any()):
            raise ValueError(f"class {c} has no training examples to search label words with")
        total = logprobs[y == c].sum(0)  # (V,)
        words: list[str] = []
        taken: set[str] = set()
        for token in torch.argsort(total, descending=True).tolist():
            word = _whole_word(tokenizer, token, space)
            if word is not None and word.lower() not in taken:
                words.append(word)
                taken.add(word.lower())
                if len(words) == k:
                    break
        out.append(words)
    return out


def search_label_words(
    model: nn.Module,
    tokenizer: Any,
    template: Template,
    train: Sequence[Example],
    dev: Sequence[Example],
    num_labels: int,
    k: int = 5,
    top: int = 10,
    rerank: Callable[[tuple[str, ...]], float] | None = None,
    max_length: int | None = 128,
) -> LabelSearchResult:
    """LM-BFF's search (module docstring). Words that occur as candidates of two classes are skipped in an
    assignment (a word must verbalize one class)."""
    space = next(p for p in template.parts if p.kind in ("mask", "answer")).space
    train_lp = answer_logprobs(model, tokenizer, template, train, max_length=max_length)
    train_y = torch.tensor([ex["label"] for ex in train])
    cands = candidate_words(train_lp, train_y.tolist(), num_labels, tokenizer, k=k, space=space)
    ids = [[_word_id(tokenizer, w, space) for w in ws] for ws in cands]
    combos = [c for c in itertools.product(*[range(len(ws)) for ws in cands]) if _distinct(cands, c)]
    if not combos:
        raise ValueError(f"no assignment with distinct words per class among the candidates {cands}")
    scored = []
    for combo in combos:
        token_ids = torch.tensor([ids[c][i] for c, i in enumerate(combo)])
        scored.append((_accuracy(train_lp[:, token_ids], train_y), combo))
    scored.sort(key=lambda t: (-t[0], t[1]))
    kept = scored[:top]
    assignments = [tuple(cands[c][i] for c, i in enumerate(combo)) for _, combo in kept]
    if rerank is None:
        dev_lp = answer_logprobs(model, tokenizer, template, dev, max_length=max_length)
        dev_y = torch.tensor([ex["label"] for ex in dev])
        dev_acc = [
            _accuracy(dev_lp[:, torch.tensor([ids[c][i] for c, i in enumerate(combo)])], dev_y)
            for _, combo in kept
        ]
    else:
        dev_acc = [float(rerank(words)) for words in assignments]
    best = max(range(len(kept)), key=lambda j: (dev_acc[j], kept[j][0], -j))
    return LabelSearchResult(cands, assignments, [s for s, _ in kept], dev_acc, assignments[best])


def _accuracy(scores: Tensor, labels: Tensor) -> float:
    return float((scores.argmax(-1) == labels).float().mean())


def _distinct(cands: list[list[str]], combo: tuple[int, ...]) -> bool:
    words = [cands[c][i].lower() for c, i in enumerate(combo)]
    return len(set(words)) == len(words)


def _whole_word(tokenizer: Any, token: int, space: bool) -> str | None:
    text = tokenizer.decode([token]).strip()
    if not text.isalpha() or token in set(getattr(tokenizer, "all_special_ids", ())):
        return None
    return text if encode_piece(tokenizer, (" " if space else "") + text) == [token] else None


def _word_id(tokenizer: Any, word: str, space: bool) -> int:
    return encode_piece(tokenizer, (" " if space else "") + word)[0]
