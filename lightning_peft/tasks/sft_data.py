"""`SFTData`: chat / prompt-response JSONL -> token batches with the loss on the assistant's tokens only.

With no paths the bundled task is used (`lightning_peft.tasks.stdlib_docs`: name the Python standard-library
function a docstring describes), so ``SFTData(tokenizer="smollm2")`` works offline out of the box.
Training batches are length-grouped (Hugging Face Trainer's ``group_by_length``): each epoch is a seeded
shuffle cut into chunks of ``50 * batch_size`` examples, each chunk sorted by length and split into batches,
and the batches shuffled again, so padding stays small while the order stays random and resumable.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_peft.tasks.chat_format import (
    IGNORE_INDEX,
    EncodedChat,
    check_chat_tokenizer,
    encode_chat,
    read_chat_jsonl,
)
from lightning_peft.tasks.chat_tokenizer import byte_chat_tokenizer
from lightning_peft.tasks.pretrained import load_tokenizer
from lightning_peft.tasks.resumable import EpochSeededSampler, ResumableDataLoader

__all__ = ["LengthGroupedSampler", "SFTCollator", "SFTData"]

# The bundled task, written by `lightning_peft.tasks.stdlib_docs` (not imported here so that
# ``python -m lightning_peft.tasks.stdlib_docs`` runs cleanly).
TRAIN_FILE = Path(__file__).resolve().parent / "data" / "stdlib_docs_train.jsonl"
VAL_FILE = Path(__file__).resolve().parent / "data" / "stdlib_docs_val.jsonl"


class LengthGroupedSampler(EpochSeededSampler):
    """Seeded shuffle, sorted by length within chunks of ``group * batch_size``, batches shuffled.

    Args:
        lengths: Token count of every example.
        batch_size: Examples per batch.
        seed: Base seed; epoch ``e`` uses ``seed + e``.
        group: Batches per sorted chunk.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: int = 50) -> None:
        super().__init__(lengths, seed)
        self.lengths, self.batch_size, self.group = lengths, batch_size, group

    def order(self, generator: torch.Generator) -> list[int]:
        """This epoch's index order: batches of similar length, in random order."""
        perm = torch.randperm(len(self.lengths), generator=generator).tolist()
        chunk = self.group * self.batch_size
        batches = []
        for start in range(0, len(perm), chunk):
            part = sorted(perm[start : start + chunk], key=lambda i: -self.lengths[i])
            batches += [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        # The last (possibly short) batch stays last so that every other batch is full.
        full, tail = (batches[:-1], batches[-1:]) if len(perm) % self.batch_size else (batches, [])
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return [i for batch in shuffled + tail for i in batch]


class SFTCollator:
    """Right-pads ``input_ids`` / ``labels`` (with ``-100``) / ``attention_mask`` for the loss, and left-pads
    the prompts (``prompt_ids``, ``prompt_mask``) for batched generation; ``references`` stay strings."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[EncodedChat]) -> dict[str, Any]:
        """Collate ``B`` examples into ``(B, T)`` training tensors and ``(B, P)`` prompt tensors."""
        longest = max(len(e.input_ids) for e in examples)
        longest_prompt = max(len(e.prompt_ids) for e in examples)
        pad = self.pad_token_id

        def right(seq: list[int], value: int) -> list[int]:
            return seq + [value] * (longest - len(seq))

        def left(seq: list[int], value: int) -> list[int]:
            return [value] * (longest_prompt - len(seq)) + seq

        return {
            "input_ids": torch.tensor([right(e.input_ids, pad) for e in examples]),  # (B, T)
            "attention_mask": torch.tensor([right([1] * len(e.input_ids), 0) for e in examples]),
            "labels": torch.tensor([right(e.labels, IGNORE_INDEX) for e in examples]),
            "prompt_ids": torch.tensor([left(e.prompt_ids, pad) for e in examples]),  # (B, P)
            "prompt_mask": torch.tensor([left([1] * len(e.prompt_ids), 0) for e in examples]),
            "references": [e.reference for e in examples],
        }


class SFTData(L.LightningDataModule):
    """Supervised fine-tuning data: JSONL conversations tokenized once with the tokenizer's chat template.

    Each line is ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` (ending with
    an assistant turn) or ``{"prompt": ..., "response": ...}``. Loss is on assistant tokens only.

    Example::

        data = SFTData(tokenizer="smollm2")  # the bundled stdlib-docstring task
        data = SFTData("train.jsonl", "val.jsonl", tokenizer="./my-model", max_length=512)
        data = SFTData(tokenizer="bytes")     # in-code byte tokenizer for tiny random models

    Args:
        train_path: Training JSONL; ``None`` uses the bundled task (and its held-out split when ``val_path``
            is ``None`` too).
        val_path: Validation JSONL, or ``None`` for none (unless the bundled task is used).
        tokenizer: ``"smollm2"``, a local tokenizer folder, or ``"bytes"`` for the in-code
            `byte_chat_tokenizer` (pair it with a tiny model of ``vocab_size >= 260``). Never downloaded.
        chat_template: A Jinja chat template replacing the tokenizer's own.
        max_length: Maximum tokens per conversation; longer ones are cut at the end (a warning counts them).
        batch_size: Examples per batch (per device).
        num_workers: DataLoader worker processes.
        seed: Seed of the training order.
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        tokenizer: str = "smollm2",
        chat_template: str | None = None,
        max_length: int = 256,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2; got {max_length}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0; got {batch_size}, {num_workers}")
        if train_path is None:
            train_path = str(TRAIN_FILE)
            val_path = str(VAL_FILE) if val_path is None else val_path
        self.paths: dict[str, str | None] = {"train": train_path, "val": val_path}
        self.max_length, self.batch_size, self.num_workers, self.seed = (
            max_length,
            batch_size,
            num_workers,
            seed,
        )
        self.tokenizer = byte_chat_tokenizer() if tokenizer == "bytes" else load_tokenizer(tokenizer)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        check_chat_tokenizer(self.tokenizer)
        self.datasets: dict[str, list[EncodedChat]] = {}

    @property
    def pad_token_id(self) -> int:
        """Id used for padding (the EOS id when the tokenizer has no pad token; padding is masked anyway)."""
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id or 0)

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize the splits ``stage`` needs (``fit``: train + val; ``validate``: val)."""
        splits = {"fit": ["train", "val"], "validate": ["val"]}.get(stage or "", ["train", "val"])
        for split in splits:
            if split in self.datasets or self.paths[split] is None:
                if stage == "validate" and self.paths[split] is None:
                    raise ValueError("stage 'validate' needs val_path, which is None")
                continue
            self.datasets[split] = self.encode(split)

    def encode(self, split: str) -> list[EncodedChat]:
        """Tokenize one split, warn about truncated conversations, drop those with no labelled token left.

        Raises:
            ValueError: The file has no conversation, or none keeps a labelled token within ``max_length``.
        """
        path = self.paths[split]
        assert path is not None
        conversations = read_chat_jsonl(path)
        if not conversations:
            raise ValueError(f"{split} file {path} has no examples (every line is blank)")
        encoded = [encode_chat(self.tokenizer, messages, self.max_length) for messages in conversations]
        kept = [e for e in encoded if any(t != IGNORE_INDEX for t in e.labels)]
        cut = sum(e.truncated for e in encoded)
        if cut:
            warnings.warn(
                f"{split} file {path}: {cut} of {len(encoded)} conversations are longer than max_length="
                f"{self.max_length} tokens and were truncated ({len(encoded) - len(kept)} of them kept no "
                "response token and were dropped); raise max_length to keep them whole",
                stacklevel=2,
            )
        if not kept:
            raise ValueError(
                f"{split} file {path}: no conversation keeps a response token within max_length="
                f"{self.max_length}"
            )
        return kept

    def train_dataloader(self) -> DataLoader:
        """Length-grouped, seeded batches that resume mid-epoch exactly."""
        if "train" not in self.datasets:
            self.setup("fit")
        data = self.datasets["train"]
        sampler = LengthGroupedSampler([len(e.input_ids) for e in data], self.batch_size, self.seed)
        return ResumableDataLoader(
            data,  # type: ignore[arg-type]
            seed=self.seed,
            sampler=sampler,
            trainer_ref=lambda: getattr(self, "trainer", None),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=SFTCollator(self.pad_token_id),
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order, or ``[]`` without a validation file."""
        if self.paths["val"] is None:
            return []
        if "val" not in self.datasets:
            self.setup("validate")
        return DataLoader(
            self.datasets["val"],  # type: ignore[arg-type]
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=SFTCollator(self.pad_token_id),
        )
