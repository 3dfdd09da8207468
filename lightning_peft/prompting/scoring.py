"""`PromptScorer`: template + verbalizer + tokenizer -> tokenized features, batches and class scores.

Masked LMs: an example is rendered once per distinct label-word length ``n`` with ``n`` masks; a word of
``n`` tokens is scored from the rendering with ``n`` masks, token ``i`` at mask ``i``, all in one forward.
Causal LMs: the prompt ends at ``{answer}``; single-token words are scored from one forward (the logits at
the prompt's last position), a multi-token word ``t_1..t_n`` from a forward over ``prompt + t_1..t_n``
(teacher forcing, one forward per word): ``log p = sum_i log p(t_i | prompt, t_<i)``.

Logits are read at positions shifted by whatever a tuner prepended (prompt tuning's virtual tokens make
the output longer than the input), so every tuner works underneath.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.prompting.soft import SoftTokens
from lightning_peft.prompting.template import Template
from lightning_peft.prompting.tokens import LMKind
from lightning_peft.prompting.verbalizer import LabelWords, Verbalizer

__all__ = ["PromptScorer", "lm_logits"]

Features = dict[str, Any]


def lm_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    soft_index: Tensor | None = None,
    soft: SoftTokens | None = None,
) -> tuple[Tensor, int]:
    """Run the LM; soft tokens go in through ``inputs_embeds``.

    Returns:
        ``(B, T', V)`` logits and the offset ``T' - T`` of prepended virtual tokens.
    """
    if soft is not None and soft_index is not None and bool((soft_index >= 0).any()):
        embeds = soft(model.get_input_embeddings()(input_ids), soft_index)  # (B, T, H)
        logits = model(inputs_embeds=embeds, attention_mask=attention_mask).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits, logits.shape[1] - input_ids.shape[1]


class PromptScorer(nn.Module):
    """Scores classes with an LM through a pattern and a verbalizer.

    Example::

        scorer = PromptScorer(Template("{text} It was {mask}."), Verbalizer({...}), tokenizer, "masked")
        batch = scorer.collate([scorer.encode({"text": t}, max_length=128) for t in texts])
        scores = scorer(model, batch)   # (B, C)

    Args:
        template: The pattern.
        verbalizer: The label words.
        tokenizer: The model's tokenizer.
        kind: ``"masked"`` or ``"causal"`` (:func:`~lightning_peft.prompting.tokens.lm_kind`).

    Raises:
        ValueError: The template does not suit ``kind``, or a label word is unrepresentable.
    """

    def __init__(self, template: Template, verbalizer: Verbalizer, tokenizer: Any, kind: LMKind) -> None:
        super().__init__()
        template.check_kind(kind)
        self.template, self.verbalizer, self.tokenizer, self.kind = template, verbalizer, tokenizer, kind
        space = next(p for p in template.parts if p.kind in ("mask", "answer")).space
        words = verbalizer.tokenize(tokenizer, space=space)
        self.num_labels, self.word_strings = words.num_labels, words.words
        self.register_buffer("word_ids", words.ids, persistent=False)  # (W, L)
        self.register_buffer("word_lengths", words.lengths, persistent=False)  # (W,)
        self.register_buffer("word_label", words.label, persistent=False)  # (W,)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0

    @property
    def words(self) -> LabelWords:
        """The label words on the scorer's device."""
        return LabelWords(
            self.word_ids, self.word_lengths, self.word_label, self.num_labels, self.word_strings
        )

    # -- features and batches -------------------------------------------------------------------------
    def encode(
        self,
        example: Mapping[str, Any],
        max_length: int | None = None,
        demonstrations: Sequence[tuple[Mapping[str, Any], str]] = (),
        separator: str = " ",
    ) -> Features:
        """Features of one example (every masked-LM rendering is truncated alike, for the longest word)."""
        longest = int(self.word_lengths.max())
        kw = {"max_length": max_length, "demonstrations": demonstrations, "separator": separator}
        if self.kind == "causal":
            enc = self.template.encode(example, self.tokenizer, kind="causal", reserve=longest, **kw)
            return {"input_ids": enc.input_ids, "target": enc.target, "soft_index": enc.soft_index}
        out: Features = {}
        for n in sorted({int(x) for x in self.word_lengths}):
            enc = self.template.encode(
                example, self.tokenizer, kind="masked", num_masks=n, reserve=longest - n, **kw
            )
            out[f"masks_{n}"] = {
                "input_ids": enc.input_ids,
                "target": enc.target,
                "soft_index": enc.soft_index,
            }
        return out

    def collate(self, features: Sequence[Features], labels: Sequence[int] | None = None) -> dict[str, Any]:
        """Right-pad features into a batch (``labels`` added when given)."""
        if self.kind == "causal":
            batch: dict[str, Any] = _pad(features, self.pad_id)
        else:
            batch = {key: _pad([f[key] for f in features], self.pad_id) for key in features[0]}
        if labels is not None:
            batch["labels"] = torch.tensor(list(labels), dtype=torch.long)
        return batch

    # -- scores ---------------------------------------------------------------------------------------
    def word_scores(
        self, model: nn.Module, batch: Mapping[str, Any], soft: SoftTokens | None = None
    ) -> tuple[Tensor | None, Tensor]:
        """``(B, W)`` raw logits of single-token words (else ``None``) and ``(B, W)`` word log-probs."""
        if self.kind == "causal":
            return self._causal(model, batch, soft)
        return self._masked(model, batch, soft)

    def forward(self, model: nn.Module, batch: Mapping[str, Any], soft: SoftTokens | None = None) -> Tensor:
        """``(B, C)`` class scores by the verbalizer's aggregation."""
        raw, logprobs = self.word_scores(model, batch, soft)
        return self.verbalizer.aggregate(raw, logprobs, self.words)

    def _masked(
        self, model: nn.Module, batch: Mapping[str, Any], soft: SoftTokens | None
    ) -> tuple[Tensor | None, Tensor]:
        words = self.words
        columns: list[Tensor] = []
        raw_columns: list[Tensor] = []
        order: list[Tensor] = []
        for n in words.distinct_lengths:
            part = batch[f"masks_{n}"]
            logits, offset = lm_logits(
                model, part["input_ids"], part["attention_mask"], part["soft_index"], soft
            )
            steps = torch.arange(n, device=logits.device)
            pos = part["target"].unsqueeze(1) + offset + steps  # (B, n)
            at = logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B, n, V)
            logp = at.float().log_softmax(-1)
            sel = (words.lengths == n).nonzero().squeeze(1)  # (w,)
            ids = words.ids[sel, :n]  # (w, n)
            token_logp = logp[:, steps.expand_as(ids), ids]  # (B, w, n)
            columns.append(token_logp.sum(-1))
            raw_columns.append(at[:, 0, ids[:, 0]].float())
            order.append(sel)
        inverse = torch.argsort(torch.cat(order))
        logprobs = torch.cat(columns, 1)[:, inverse]  # (B, W)
        raw = torch.cat(raw_columns, 1)[:, inverse] if words.single_token else None
        return raw, logprobs

    def _causal(
        self, model: nn.Module, batch: Mapping[str, Any], soft: SoftTokens | None
    ) -> tuple[Tensor | None, Tensor]:
        words = self.words
        ids, mask, target, soft_index = (
            batch[k] for k in ("input_ids", "attention_mask", "target", "soft_index")
        )
        B = ids.shape[0]
        rows = torch.arange(B, device=ids.device)
        if words.single_token:
            logits, offset = lm_logits(model, ids, mask, soft_index, soft)
            last = logits[rows, target - 1 + offset].float()  # (B, V): predicts the answer's first token
            tok = words.ids[:, 0]
            return last[:, tok], last.log_softmax(-1)[:, tok]
        L = words.ids.shape[1]
        steps = torch.arange(L, device=ids.device)
        pos = target.unsqueeze(1) + steps  # (B, L): where the word's tokens go
        ext_ids = torch.cat([ids, ids.new_full((B, L), self.pad_id)], 1)  # (B, T + L)
        ext_mask = torch.cat([mask, mask.new_zeros(B, L)], 1)
        ext_soft = torch.cat([soft_index, soft_index.new_full((B, L), -1)], 1)
        ext_mask = ext_mask.scatter(1, pos, 0)
        columns = []
        for w in range(words.ids.shape[0]):
            n = int(words.lengths[w])
            token = words.ids[w, :n].expand(B, n)  # (B, n)
            row_ids = ext_ids.scatter(1, pos[:, :n], token)
            row_mask = ext_mask.scatter(1, pos[:, :n], 1)
            logits, offset = lm_logits(model, row_ids, row_mask, ext_soft, soft)
            pred = pos[:, :n] - 1 + offset  # (B, n): position predicting each token
            at = logits.gather(1, pred.unsqueeze(-1).expand(-1, -1, logits.shape[-1])).float()  # (B, n, V)
            columns.append(at.log_softmax(-1).gather(2, token.unsqueeze(-1)).squeeze(-1).sum(-1))
        return None, torch.stack(columns, 1)  # (B, W)


def _pad(features: Sequence[Features], pad_id: int) -> dict[str, Tensor]:
    longest = max(len(f["input_ids"]) for f in features)
    ids, mask, soft = [], [], []
    for f in features:
        gap = longest - len(f["input_ids"])
        ids.append(list(f["input_ids"]) + [pad_id] * gap)
        mask.append([1] * len(f["input_ids"]) + [0] * gap)
        soft.append(list(f["soft_index"]) + [-1] * gap)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
        "soft_index": torch.tensor(soft, dtype=torch.long),
        "target": torch.tensor([f["target"] for f in features], dtype=torch.long),
    }
