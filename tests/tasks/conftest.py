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
