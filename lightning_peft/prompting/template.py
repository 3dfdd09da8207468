"""Patterns (PET, Schick & Schütze 2021): a task input written as a cloze or a continuation.

``Template("{text} It was {mask}.")`` turns ``{"text": "Great film!"}`` into ``Great film! It was [MASK].``
for a masked LM, whose MLM head then scores the label words at ``[MASK]``. For a causal LM the answer is the
continuation: ``Template("Review: {text} Sentiment: {answer}")`` ends where the label word would follow.

Pattern syntax:

* ``{name}``: an input slot (``{text}``, ``{premise}``, ``{hypothesis}``, any identifier), filled from the
  example dict. Slots are *shortenable* (truncated from the right when the input is too long) unless
  listed in ``fixed``. The pattern's own words, the mask and soft tokens are never cut.
* ``{mask}``: where a masked LM predicts the label word (one mask per token of a multi-token word).
* ``{answer}``: the answer position of a causal LM; it must end the pattern.
* ``{soft}``, ``{soft:4}``, ``{soft:It was}``: trainable soft tokens (1, 4, or one per token of the given
  words, initialised from those words' embeddings); see :class:`~lightning_peft.prompting.soft.SoftTokens`.

Whitespace before a slot, mask or answer belongs to what follows it: a byte-level BPE encodes ``" great"``
and ``"great"`` differently, so label words after ``"was {mask}"`` are tokenized with their leading space.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_peft.prompting.tokens import LMKind, add_special_tokens, encode_piece, mask_token_id

__all__ = ["Encoding", "Part", "Template"]

_FIELD = re.compile(r"\{([^{}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PartKind = Literal["text", "slot", "mask", "answer", "soft"]


@dataclass(frozen=True)
class Part:
    """One piece of a pattern: literal ``text``, an input ``slot``, the ``mask``, the ``answer`` or ``soft``
    tokens. ``space`` says whether whitespace precedes it in the pattern."""

    kind: PartKind
    value: str = ""
    space: bool = False
    count: int = 0


@dataclass
class Encoding:
    """A rendered example.

    Attributes:
        input_ids: Token ids, special tokens included.
        target: Index of the first mask (masked LM) or of the first answer token (causal LM: the
            prompt's length, so the answer's first token is predicted at ``target - 1``).
        soft_index: Per token, the index of the soft token it is (``-1`` for ordinary tokens).
        answer_space: Whether label words follow whitespace (tokenize them with a leading space).
    """

    input_ids: list[int]
    target: int
    soft_index: list[int] = field(default_factory=list)
    answer_space: bool = True


class Template:
    """A PET pattern with named slots, a mask or answer position and optional soft tokens.

    Example::

        t = Template("{premise} Question: {hypothesis}? Answer: {mask}.", fixed=["hypothesis"])
        enc = t.encode({"premise": "...", "hypothesis": "..."}, tokenizer, kind="masked", max_length=128)

    Args:
        pattern: The pattern (syntax in the module docstring).
        fixed: Slots never truncated (default: every slot may be shortened).

    Raises:
        ValueError: No ``{mask}`` / ``{answer}``, both, more than one, text after ``{answer}``, a slot name
            that is not an identifier, a malformed ``{soft:...}``, or ``fixed`` naming an unknown slot.
    """

    def __init__(self, pattern: str, fixed: Sequence[str] = ()) -> None:
        self.pattern = pattern
        self.parts = _parse(pattern)
        targets = [p for p in self.parts if p.kind in ("mask", "answer")]
        if len(targets) != 1:
            found = "none" if not targets else ", ".join("{" + p.kind + "}" for p in targets)
            raise ValueError(
                f"template {pattern!r} needs exactly one {{mask}} (masked LM) or {{answer}} (causal LM) "
                f"where the label word goes; found {found}"
            )
        self.target_kind = targets[0].kind
        if self.target_kind == "answer" and self.parts[-1].kind != "answer":
            raise ValueError(
                f"template {pattern!r}: {{answer}} must end the pattern (a causal LM continues the text "
                "there); move the text after it before it"
            )
        self.slots = tuple(dict.fromkeys(p.value for p in self.parts if p.kind == "slot"))
        unknown = sorted(set(fixed) - set(self.slots))
        if unknown:
            raise ValueError(f"fixed={unknown}: not slots of {pattern!r} (its slots: {list(self.slots)})")
        self.fixed = frozenset(fixed)
        self.soft_parts = [p for p in self.parts if p.kind == "soft"]

    def __repr__(self) -> str:
        return f"Template({self.pattern!r})"

    def soft_counts(self, tokenizer: Any) -> list[int]:
        """Soft tokens per ``{soft...}`` part (init words count one per token)."""
        return [len(ids) if isinstance(ids, list) else ids for ids in self.soft_init_ids(tokenizer)]

    def check_kind(self, kind: LMKind) -> None:
        """Refuse a masked-LM template on a causal LM and the other way round."""
        if kind == "causal" and self.target_kind == "mask":
            raise ValueError(
                f"template {self.pattern!r} has a {{mask}}, which only a masked LM can fill; a causal LM "
                "predicts a continuation: end the pattern with {answer} instead, e.g. "
                "'{text} It was {answer}'"
            )
        if kind == "masked" and self.target_kind == "answer":
            raise ValueError(
                f"template {self.pattern!r} has an {{answer}} continuation, which a masked LM cannot "
                "predict: put {mask} where the label word goes"
            )

    def soft_init_ids(self, tokenizer: Any) -> list[list[int] | int]:
        """Per ``{soft...}`` part: the token ids of its init words, or the count of random ones."""
        out: list[list[int] | int] = []
        for part in self.soft_parts:
            if part.value:
                ids = encode_piece(tokenizer, part.value)
                if not ids:
                    raise ValueError(f"{{soft:{part.value}}}: the init words encode to no token")
                out.append(ids)
            else:
                out.append(part.count)
        return out

    def encode(
        self,
        example: Mapping[str, Any],
        tokenizer: Any,
        *,
        kind: LMKind,
        num_masks: int = 1,
        max_length: int | None = None,
        reserve: int = 0,
        demonstrations: Sequence[tuple[Mapping[str, Any], str]] = (),
        separator: str = " ",
    ) -> Encoding:
        """Render and tokenize one example.

        Args:
            example: Slot values (``{"text": ...}``); extra keys are ignored.
            tokenizer: A Hugging Face tokenizer (a mask token is needed for ``{mask}``).
            kind: ``"masked"`` or ``"causal"``: the model family that reads it.
            num_masks: Mask tokens at ``{mask}`` (the label word's token count).
            max_length: Maximum ids including special tokens (and ``reserve``); shortenable slots are cut
                from the right end, longest first (PET), never the pattern's words, masks or soft tokens.
            reserve: Ids to leave free (a causal LM's answer tokens appended later).
            demonstrations: LM-BFF demonstrations, ``(example, label word)`` pairs rendered with the same
                pattern, the label word in place of the mask; after the query for a masked LM, before it
                for a causal LM.
            separator: Text between the query and each demonstration.

        Raises:
            KeyError: ``example`` lacks a slot of the pattern.
            ValueError: Wrong model kind, or the input cannot fit ``max_length`` even with every
                shortenable slot emptied.
        """
        self.check_kind(kind)
        if num_masks < 1:
            raise ValueError(f"num_masks must be >= 1; got {num_masks}")
        if demonstrations and self.soft_parts:
            raise ValueError("demonstrations with soft tokens are not supported: use a discrete pattern")
        # (example, word) per segment, in reading order: demonstrations follow a masked-LM query and
        # precede a causal-LM one (whose answer must come last).
        rendered: list[tuple[Mapping[str, Any], str | None]] = [(example, None)]
        demos = [(ex, str(w)) for ex, w in demonstrations]
        order = rendered + demos if kind == "masked" else demos + rendered
        sep_ids = encode_piece(tokenizer, separator.rstrip()) if separator.strip() else []
        pieces: list[_Piece] = []
        for i, (ex, word) in enumerate(order):
            if i and sep_ids:
                pieces.append(_Piece(list(sep_ids), "text"))
            first_space = bool(i) and separator[-1:].isspace()
            pieces += self._pieces(ex, tokenizer, num_masks=num_masks, word=word, first_space=first_space)
        specials = len(add_special_tokens(tokenizer, [])[0])
        if max_length is not None:
            _truncate(pieces, max_length - specials - reserve, self.pattern)
        ids: list[int] = []
        soft: list[int] = []
        target = -1
        for piece in pieces:
            if piece.kind in ("mask", "answer"):
                target = len(ids)
            soft.extend(piece.soft if piece.soft else [-1] * len(piece.ids))
            ids.extend(piece.ids)
        full, offset = add_special_tokens(tokenizer, ids)
        if kind == "causal":
            full = full[: offset + len(ids)]  # no EOS before the answer
        soft = [-1] * offset + soft + [-1] * (len(full) - offset - len(soft))
        target_part = next(p for p in self.parts if p.kind in ("mask", "answer"))
        return Encoding(full, target + offset, soft, answer_space=target_part.space)

    def _pieces(
        self,
        example: Mapping[str, Any],
        tokenizer: Any,
        *,
        num_masks: int,
        word: str | None,
        first_space: bool,
    ) -> list[_Piece]:
        pieces: list[_Piece] = []
        soft_start = 0
        for index, part in enumerate(self.parts):
            lead = " " if part.space or (index == 0 and first_space) else ""
            if part.kind == "text":
                pieces.append(_Piece(encode_piece(tokenizer, lead + part.value), "text"))
            elif part.kind == "slot":
                if part.value not in example:
                    raise KeyError(
                        f"template {self.pattern!r} needs slot {part.value!r}; the example has "
                        f"{sorted(example)}. Rename the column or the slot."
                    )
                text = str(example[part.value]).strip()
                ids = encode_piece(tokenizer, lead + text)
                pieces.append(_Piece(ids, "slot", shortenable=part.value not in self.fixed))
            elif part.kind == "mask" and word is None:
                pieces.append(_Piece([mask_token_id(tokenizer)] * num_masks, "mask"))
            elif part.kind in ("mask", "answer") and word is not None:
                pieces.append(_Piece(encode_piece(tokenizer, lead + word), "text"))
            elif part.kind == "answer":
                pieces.append(_Piece([], "answer"))
            else:  # soft
                init = encode_piece(tokenizer, part.value) if part.value else []
                placeholder = init or [_placeholder_id(tokenizer)] * part.count
                index = list(range(soft_start, soft_start + len(placeholder)))
                pieces.append(_Piece(placeholder, "soft", soft=index))
                soft_start += len(placeholder)
        return pieces


@dataclass
class _Piece:
    ids: list[int]
    kind: str
    shortenable: bool = False
    soft: list[int] = field(default_factory=list)


def _truncate(pieces: list[_Piece], budget: int, pattern: str) -> None:
    """Cut the longest shortenable piece by one id from its right end until the total fits ``budget``."""
    total = sum(len(p.ids) for p in pieces)
    while total > budget:
        longest = max((p for p in pieces if p.shortenable), key=lambda p: len(p.ids), default=None)
        if longest is None or not longest.ids:
            fixed = sum(len(p.ids) for p in pieces if not p.shortenable)
            raise ValueError(
                f"template {pattern!r}: its pattern words, masks and fixed slots take {fixed} tokens, more "
                f"than the {budget} max_length leaves; raise max_length or shorten the pattern"
            )
        longest.ids.pop()
        total -= 1


def _placeholder_id(tokenizer: Any) -> int:
    for name in ("unk_token_id", "pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _parse(pattern: str) -> list[Part]:
    parts: list[Part] = []
    pos = 0
    for match in [*_FIELD.finditer(pattern), None]:
        literal = pattern[pos : match.start() if match else len(pattern)]
        if "{" in literal or "}" in literal:
            raise ValueError(f"template {pattern!r} has an unbalanced brace near {literal.strip()!r}")
        if literal.strip():
            parts.append(Part("text", literal.strip(), space=literal[0].isspace() and bool(parts)))
        if match is None:
            break
        space = bool(literal) and literal[-1].isspace() and bool(parts)
        parts.append(_field(match.group(1).strip(), space, pattern))
        pos = match.end()
    return parts


def _field(body: str, space: bool, pattern: str) -> Part:
    if body in ("mask", "answer"):
        return Part(body, space=space)  # type: ignore[arg-type]
    if body == "soft" or body.startswith("soft:"):
        arg = body[5:].strip()
        if not body[4:]:
            return Part("soft", "", space, count=1)
        if arg.isdigit() and int(arg) >= 1:
            return Part("soft", "", space, count=int(arg))
        if not arg or arg.isdigit():
            raise ValueError(f"template {pattern!r}: {{{body}}} needs a count >= 1 or init words")
        return Part("soft", arg, space, count=-1)
    if not _NAME.fullmatch(body):
        raise ValueError(
            f"template {pattern!r}: {{{body}}} is not a slot name (an identifier such as {{text}}, "
            "{premise}), {mask}, {answer} or {soft[:n | :words]}"
        )
    return Part("slot", body, space)
