"""Helpers the tasks tests import (the fixtures built on them are in ``conftest.py``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

TINY_VOCAB = 128


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as CSV or JSONL depending on ``path``'s suffix."""
    if path.suffix == ".csv":
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


#: Tiny causal LMs whose vocabulary covers `byte_chat_tokenizer` (260 ids; 256 pad, 258 end of turn).
TINY_CAUSAL: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "vocab_size": 260,
        "max_position_embeddings": 512,
        "pad_token_id": 256,
        "eos_token_id": 258,
        "bos_token_id": 259,
    },
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "vocab_size": 260,
        "n_positions": 512,
        "pad_token_id": 256,
        "eos_token_id": 258,
        "bos_token_id": 259,
    },
}


def write_chat(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """Write ``(prompt, response)`` pairs as a chat-messages JSONL file."""
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]} for p, r in pairs
    ]
    return write_rows(path, rows)
