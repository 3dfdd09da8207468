"""Verbalizers: label words whose LM scores become class scores.

A verbalizer maps every label to one or more words (``{"pos": ["great", "good"], "neg": ["terrible"]}``).
The LM scores each word at the answer position, then a named *aggregation* turns word scores into class
scores ``s`` (cross-entropy over ``s`` is PET's loss):

* ``"pet"`` (PET, Schick & Schütze 2021): ``s_y = mean_{v in V_y} z_v``, the mean of the raw LM logits of the
  label's words (raw logits, not log-probabilities: with ``V_0 = {a}``, ``V_1 = {b, c}`` and logits
  ``a=1, b=2, c=0``, ``s = [1, 1]``). When some word spans several tokens, raw logits of different
  positions are not comparable and PET's own multi-mask code switches to log-probabilities: then
  ``z_v`` is the word's log-probability (below).
* ``"mean_log_prob"`` (OpenPrompt's ``ManualVerbalizer``): softmax over *all* label words of all labels,
  log, then the mean over the label's words: ``s_y = mean_{v in V_y} log q_v``.
* ``"log_mean_prob"``: the log of the label's mean probability, ``s_y = log mean_{v in V_y} q_v``, with
  ``q`` the same softmax over all label words.

A word's log-probability is the sum of its tokens' log-probabilities: at its masks for a masked LM (one
mask per token, all predicted in one forward: PET's training-time scoring), or ``sum_i log p(t_i | prompt,
t_<i)`` for a causal LM. ``length_normalize=True`` divides it by the token count (a per-token mean).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_peft.prompting.tokens import encode_piece

__all__ = ["AGGREGATIONS", "Aggregation", "LabelWords", "Verbalizer", "aggregate"]

Aggregation = Literal["pet", "mean_log_prob", "log_mean_prob"]
AGGREGATIONS: tuple[str, ...] = ("pet", "mean_log_prob", "log_mean_prob")


@dataclass
class LabelWords:
    """A verbalizer's words as token ids, flattened over labels.

    Attributes:
        ids: ``(W, L)`` token ids of every word, right-padded with ``-1`` to the longest word.
        lengths: ``(W,)`` tokens per word.
        label: ``(W,)`` label index of each word.
        num_labels: Number of labels ``C``.
        words: The words, in the same order.
    """

    ids: Tensor
    lengths: Tensor
    label: Tensor
    num_labels: int
    words: list[str]

    @property
    def single_token(self) -> bool:
        """Every word is one token."""
        return bool((self.lengths == 1).all())

    @property
    def distinct_lengths(self) -> list[int]:
        """Sorted distinct token counts (a masked LM needs one rendering per count)."""
        return sorted({int(n) for n in self.lengths})

    def membership(self) -> Tensor:
        """``(W, C)`` one-hot matrix: word ``w`` belongs to label ``c``."""
        return torch.nn.functional.one_hot(self.label, self.num_labels).float()


class Verbalizer:
    """Label words for prompt-based classification.

    Example::

        v = Verbalizer({"positive": ["great", "good"], "negative": ["terrible"]}, aggregation="pet")
        words = v.tokenize(tokenizer, space=True)   # LabelWords: ids, lengths, label
        scores = v.aggregate(word_logits, word_logprobs, words)  # (B, C)

    Args:
        words: Label -> word or list of words, in label-id order (label ``i`` is the ``i``-th key).
        aggregation: ``"pet"``, ``"mean_log_prob"`` or ``"log_mean_prob"`` (module docstring).
        length_normalize: Divide a multi-token word's log-probability by its token count.

    Raises:
        ValueError: No labels, a label without words, an empty word, a word listed under two labels, or
            an unknown aggregation.
    """

    def __init__(
        self,
        words: Mapping[str, Sequence[str] | str],
        aggregation: Aggregation = "pet",
        length_normalize: bool = False,
    ) -> None:
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")
        if len(words) < 2:
            raise ValueError(f"a verbalizer needs words for at least 2 labels; got {list(words)}")
        self.words: dict[str, list[str]] = {}
        owner: dict[str, str] = {}
        for label, ws in words.items():
            ws = [ws] if isinstance(ws, str) else list(ws)
            if not ws:
                raise ValueError(
                    f"label {label!r} has no words; give it at least one, e.g. {{{label!r}: [...]}}"
                )
            for w in ws:
                if not isinstance(w, str) or not w.strip():
                    raise ValueError(f"label {label!r} has an empty word {w!r}")
                key = w.strip()
                if key in owner and owner[key] != label:
                    raise ValueError(
                        f"word {key!r} is listed under labels {owner[key]!r} and {label!r}: a word must "
                        "belong to one label"
                    )
                owner[key] = label
            self.words[str(label)] = [w.strip() for w in ws]
        self.labels = list(self.words)
        self.aggregation = aggregation
        self.length_normalize = length_normalize

    def __repr__(self) -> str:
        return f"Verbalizer({self.words}, aggregation={self.aggregation!r})"

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def tokenize(self, tokenizer: Any, space: bool = True) -> LabelWords:
        """Token ids of every word (``space``: the word follows whitespace in the template).

        Raises:
            ValueError: A word the tokenizer cannot represent (no tokens, or its unknown token), or two
                labels' words that tokenize to the same ids.
        """
        unk = getattr(tokenizer, "unk_token_id", None)
        rows: list[list[int]] = []
        labels: list[int] = []
        flat: list[str] = []
        seen: dict[tuple[int, ...], tuple[str, str]] = {}
        for index, (label, ws) in enumerate(self.words.items()):
            for w in ws:
                ids = encode_piece(tokenizer, (" " if space else "") + w)
                if not ids or (unk is not None and unk in ids):
                    raise ValueError(
                        f"label word {w!r} (label {label!r}) cannot be represented by "
                        f"{type(tokenizer).__name__}: it encodes to {ids} (unknown token id {unk}); "
                        "choose a word in the model's vocabulary"
                    )
                key = tuple(ids)
                if key in seen and seen[key][1] != label:
                    raise ValueError(
                        f"label words {seen[key][0]!r} ({seen[key][1]!r}) and {w!r} ({label!r}) tokenize to "
                        f"the same ids {ids}: the labels could not be told apart"
                    )
                seen[key] = (w, label)
                rows.append(ids)
                labels.append(index)
                flat.append(w)
        longest = max(len(r) for r in rows)
        padded = torch.tensor([r + [-1] * (longest - len(r)) for r in rows], dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        return LabelWords(padded, lengths, torch.tensor(labels), self.num_labels, flat)

    def aggregate(self, word_logits: Tensor | None, word_logprobs: Tensor, words: LabelWords) -> Tensor:
        """Class scores from word scores.

        Args:
            word_logits: ``(B, W)`` raw LM logits of single-token words (``None`` when some word has
                several tokens).
            word_logprobs: ``(B, W)`` log-probabilities of the words (sums over their tokens).
            words: The tokenized words.

        Returns:
            ``(B, C)`` class scores.
        """
        if self.length_normalize:
            word_logprobs = word_logprobs / words.lengths.to(word_logprobs)
        return aggregate(self.aggregation, word_logits, word_logprobs, words)


def aggregate(
    aggregation: str, word_logits: Tensor | None, word_logprobs: Tensor, words: LabelWords
) -> Tensor:
    """``(B, W)`` word scores -> ``(B, C)`` class scores by the named aggregation (module docstring)."""
    member = words.membership().to(word_logprobs)  # (W, C)
    count = member.sum(0)  # (C,)
    if aggregation == "pet":
        z = word_logits if word_logits is not None and words.single_token else word_logprobs
        return (z @ member) / count  # (B, C)
    log_q = torch.log_softmax(word_logprobs, dim=-1)  # (B, W): softmax over all label words
    if aggregation == "mean_log_prob":
        return (log_q @ member) / count
    if aggregation == "log_mean_prob":
        masked = log_q.unsqueeze(-1) + torch.log(member).unsqueeze(0)  # (B, W, C), -inf off the label
        return torch.logsumexp(masked, dim=1) - torch.log(count)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")
