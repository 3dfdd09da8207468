"""LM-BFF demonstrations (Gao et al. 2021, "Making Pre-trained Language Models Better Few-shot Learners").

Each input is followed (masked LM) or preceded (causal LM) by one demonstration per class: a training
example rendered with the same template, its label word in place of the mask. Demonstrations are drawn
per input from the training set, *similar* ones preferred: every candidate of a class is ranked by the
cosine similarity of its sentence embedding to the input's, the top ``top_fraction`` (LM-BFF: 50%) are
kept and one of them is drawn uniformly. Training draws a fresh set per input and step; inference averages
the class log-probabilities over several sets (LM-BFF: 16).

Draws are seeded per ``(seed, input, draw)``, so a set is reproducible and independent of batch order.
The embedding model is any sentence encoder; :class:`SentenceEmbedder` mean-pools a Hugging Face encoder
(the bundled all-MiniLM-L6-v2 is a sentence-embedding model: ``SentenceEmbedder("minilm")``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["DemonstrationSampler", "SentenceEmbedder", "example_text"]

Example = dict[str, Any]
Embed = Callable[[list[str]], Tensor]


def example_text(slots: Mapping[str, Any]) -> str:
    """The text an example is embedded by: its slot values joined with spaces."""
    return " ".join(str(v) for v in slots.values())


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from a Hugging Face encoder (offline).

    Args:
        name_or_path: ``"minilm"`` (bundled all-MiniLM-L6-v2) or a local encoder folder.
        batch_size: Texts per forward.
        max_length: Tokens per text.
    """

    def __init__(self, name_or_path: str = "minilm", batch_size: int = 64, max_length: int = 128) -> None:
        from lightning_peft.tasks.pretrained import load_encoder, load_tokenizer, resolve_pretrained_path

        self.tokenizer = load_tokenizer(name_or_path)
        self.model = load_encoder(resolve_pretrained_path(name_or_path)).eval()
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> Tensor:
        """``(N, H)`` unit-norm embeddings."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            hidden = self.model(**enc).last_hidden_state  # (B, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)


class DemonstrationSampler:
    """Draws one demonstration per class for an input, preferring similar training examples.

    Args:
        pool: Training examples (``{"slots", "label", "index"}``) to draw from.
        label_words: Label id -> the word that verbalizes it in a demonstration.
        embed: Sentence embedder (``None``: uniform draws, LM-BFF's random demonstrations).
        top_fraction: Share of each class's candidates kept by similarity (LM-BFF: 0.5).
        seed: Base seed.

    Raises:
        ValueError: An empty pool, a class without candidates, or ``top_fraction`` outside ``(0, 1]``.
    """

    def __init__(
        self,
        pool: Sequence[Example],
        label_words: Sequence[str],
        embed: Embed | None = None,
        top_fraction: float = 0.5,
        seed: int = 0,
    ) -> None:
        if not pool:
            raise ValueError("demonstrations need a non-empty pool of labeled examples")
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1]; got {top_fraction}")
        self.pool, self.label_words = list(pool), list(label_words)
        self.embed, self.top_fraction, self.seed = embed, top_fraction, seed
        self.by_label = [
            [i for i, ex in enumerate(self.pool) if ex["label"] == c] for c in range(len(label_words))
        ]
        empty = [label_words[c] for c, ids in enumerate(self.by_label) if not ids]
        if empty:
            raise ValueError(f"no demonstration candidates for the classes verbalized as {empty}")
        self.pool_emb = embed([example_text(ex["slots"]) for ex in self.pool]) if embed is not None else None
        self._cache: dict[str, Tensor] = {}

    def candidates(self, example: Example, exclude_self: bool = False) -> list[list[int]]:
        """Per class, the pool positions eligible for ``example`` (similarity-filtered; with
        ``exclude_self``, the pool entry with the example's ``index`` is left out: a training input)."""
        own = example.get("index") if exclude_self else None
        out = []
        sims = None
        if self.pool_emb is not None:
            sims = self.pool_emb @ self._embedding(example)  # (P,)
        for ids in self.by_label:
            ids = [i for i in ids if own is None or self.pool[i]["index"] != own] or ids
            if sims is not None:
                keep = max(1, math.ceil(self.top_fraction * len(ids)))
                order = sorted(ids, key=lambda i: (-float(sims[i]), i))
                ids = order[:keep]
            out.append(ids)
        return out

    def sample(
        self, example: Example, draw: int = 0, exclude_self: bool = False
    ) -> list[tuple[dict[str, Any], str]]:
        """One ``(slots, label word)`` per class for ``example``; ``draw`` (>= 0) numbers independent sets;
        ``exclude_self`` for training inputs, which are in the pool themselves."""
        rng = np.random.default_rng(
            [self.seed, int(example.get("index", 0)) % 2**31, draw, int(exclude_self)]
        )
        demos = []
        for c, ids in enumerate(self.candidates(example, exclude_self)):
            pick = ids[int(rng.integers(len(ids)))]
            demos.append((self.pool[pick]["slots"], self.label_words[c]))
        order = rng.permutation(len(demos))  # classes in random order, as LM-BFF
        return [demos[i] for i in order]

    def _embedding(self, example: Example) -> Tensor:
        text = example_text(example["slots"])
        if text not in self._cache:
            assert self.embed is not None
            self._cache[text] = self.embed([text])[0]
        return self._cache[text]
