"""Chat SFT encoding: the template, the prompt mask checked against hand-built ids, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_peft.tasks.chat_format import IGNORE_INDEX, encode_chat, read_chat_jsonl
from lightning_peft.tasks.chat_tokenizer import byte_chat_tokenizer

START, END = 257, 258  # <|im_start|>, <|im_end|>


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_byte_tokenizer_round_trips_text_and_chatml() -> None:
    tok = byte_chat_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "héllo"}], tokenize=False)
    assert text == "<|im_start|>user\nhéllo<|im_end|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [START, *_bytes("user\nhéllo"), END, *_bytes("\n")]
    assert tok.decode(ids) == text


def test_prompt_tokens_are_masked_exactly() -> None:
    """Ids and labels built by hand from the ChatML layout: only the answer and its end-of-turn count."""
    tok = byte_chat_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    enc = encode_chat(tok, messages, max_length=100)
    prompt = [START, *_bytes("user\nhi"), END, *_bytes("\n"), START, *_bytes("assistant\n")]
    answer = [*_bytes("ok"), END, *_bytes("\n")]
    assert enc.input_ids == prompt + answer
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + answer
    assert enc.prompt_ids == prompt
    assert enc.reference == "ok" and not enc.truncated


def test_every_assistant_turn_is_labelled_and_nothing_else() -> None:
    tok = byte_chat_tokenizer()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "yz"},
    ]
    enc = encode_chat(tok, messages, max_length=200)
    labelled = tok.decode([t for t in enc.labels if t != IGNORE_INDEX])
    assert labelled == "x<|im_end|>\nyz<|im_end|>\n"
    assert enc.reference == "yz"
    assert tok.decode(enc.prompt_ids).endswith("<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n")


def test_truncation_cuts_the_end() -> None:
    tok = byte_chat_tokenizer()
    enc = encode_chat(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 50}], 20)
    full = encode_chat(
        tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 50}], 999
    )
    assert enc.truncated and len(enc.input_ids) == 20
    assert enc.input_ids == full.input_ids[:20] and enc.labels == full.labels[:20]


def test_prompt_response_records_become_two_turns(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n\n")
    assert read_chat_jsonl(path) == [
        [{"role": "user", "content": "p"}, {"role": "assistant", "content": "r"}]
    ]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (
            {"prompt": "only a prompt"},
            r"d\.jsonl:2: expected either a 'messages' list or 'prompt' and 'response'",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}]},
            r"d\.jsonl:2: the last message must be the assistant",
        ),
        ({"messages": [{"role": "bot", "content": "q"}]}, r"d\.jsonl:2: messages\[0\] needs a 'role'"),
        (
            {"messages": [{"role": "user", "content": 3}]},
            r"d\.jsonl:2: messages\[0\] needs a string 'content'",
        ),
        ({"messages": []}, r"d\.jsonl:2: 'messages' must be a non-empty list"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, line: dict, match: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "response": "ok"}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=match):
        read_chat_jsonl(path)


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid JSON"):
        read_chat_jsonl(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        read_chat_jsonl(tmp_path / "nope.jsonl")
