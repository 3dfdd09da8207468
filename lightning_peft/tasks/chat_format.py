"""Chat examples for supervised fine-tuning: reading JSONL, applying a chat template, masking the prompt.

Loss goes on the assistant's tokens only, as in InstructGPT's SFT stage (Ouyang et al., 2022) and TRL's
``assistant_only_loss``: every other token (system, user, the template's role headers) gets label ``-100``.
The assistant spans are found in character space (``template(messages[:i], add_generation_prompt=True)``
is a prefix of ``template(messages[:i+1])``) and mapped to tokens through the tokenizer's offsets, so a BPE
merge across a span boundary can never shift the mask.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

__all__ = [
    "IGNORE_INDEX",
    "EncodedChat",
    "assistant_spans",
    "check_chat_tokenizer",
    "encode_chat",
    "read_chat_jsonl",
    "render",
]

#: Label of a token that carries no loss (``torch.nn.functional.cross_entropy``'s ``ignore_index``).
IGNORE_INDEX = -100
Message = dict[str, str]
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class EncodedChat:
    """One tokenized conversation.

    Attributes:
        input_ids: Token ids of the whole conversation, at most ``max_length``.
        labels: ``input_ids`` with every non-assistant token set to ``IGNORE_INDEX``.
        prompt_ids: The conversation before the last assistant turn, plus the generation prompt.
        reference: The last assistant turn's text (what generation is scored against).
        truncated: The conversation was cut to ``max_length``.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    reference: str
    truncated: bool


def read_chat_jsonl(path: str | Path) -> list[list[Message]]:
    """Read a JSONL file of ``{"messages": [{"role", "content"}, ...]}`` or ``{"prompt", "response"}``.

    Args:
        path: The ``.jsonl`` file.

    Returns:
        One message list per non-blank line; ``prompt``/``response`` become a user and an assistant turn.

    Raises:
        FileNotFoundError: No such file.
        ValueError: A line is not JSON, lacks the fields, or its conversation does not end with an assistant
            turn; the message names ``file:line``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"chat data file not found: {path} (absolute: {path.resolve()})")
    conversations = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                conversations.append(_parse_line(line, f"{path}:{lineno}"))
    return conversations


def _parse_line(line: str, where: str) -> list[Message]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in _ROLES:
                raise ValueError(f"{where}: messages[{i}] needs a 'role' in {_ROLES}; got {message!r:.80}")
            if not isinstance(message.get("content"), str):
                raise ValueError(f"{where}: messages[{i}] needs a string 'content'")
    elif "prompt" in record and "response" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["response"], str):
            raise ValueError(f"{where}: 'prompt' and 'response' must be strings")
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    else:
        raise ValueError(
            f"{where}: expected either a 'messages' list or 'prompt' and 'response' fields; got keys "
            f"{sorted(record)}"
        )
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's (the response to learn)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], generation_prompt: bool) -> str:
    """The chat template applied to ``messages`` as text."""
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> tuple[str, list]:
    """The rendered conversation and the ``[start, end)`` character spans of its assistant turns.

    Raises:
        ValueError: The template is not prefix-stable (a turn's rendering changes what came before it).
    """
    text = render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not upto.startswith(before) or not text.startswith(upto):
            raise ValueError(
                "the chat template renders earlier turns differently once a later turn is added, so the "
                "assistant tokens cannot be located; use a prefix-stable template (ChatML, Llama-3, ...)"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], max_length: int
) -> EncodedChat:
    """Tokenize a conversation with the tokenizer's chat template; labels only on assistant tokens.

    Args:
        tokenizer: A fast tokenizer (offsets are needed) with a ``chat_template``.
        messages: The conversation; the last message is the assistant's.
        max_length: Keep at most this many tokens (the end of the conversation is cut).

    Returns:
        The encoded conversation.
    """
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(encoded["input_ids"])
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for token, (start, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    prompt_text = render(tokenizer, messages[:-1], generation_prompt=True)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    truncated = len(ids) > max_length
    return EncodedChat(
        input_ids=ids[:max_length],
        labels=labels[:max_length],
        prompt_ids=prompt_ids,
        reference=messages[-1]["content"],
        truncated=truncated,
    )


def check_chat_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Fail early, with the fix, when a tokenizer cannot be used for chat SFT."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; pass chat_template='...' (a Jinja "
            "template such as lightning_peft.tasks.chat_tokenizer.CHATML_TEMPLATE)"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("chat SFT needs a fast tokenizer (character offsets locate the assistant tokens)")
