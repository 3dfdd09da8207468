"""`PromptData`: raw text examples (slot dicts + labels) for prompt-based classification, few-shot sampled.

The data module does not tokenize: a prompt-based model renders each example through its own template
(:class:`~lightning_peft.tasks.prompt_classifier.PromptClassifier` does it in ``on_before_batch_transfer``),
so batches are ``{"examples": [{"text": ...}, ...], "labels": (B,), "index": (B,)}`` (plus ``"targets"``
``(B, C)`` soft labels when the training file has them, for distillation).

Few-shot (LM-BFF's protocol): ``shots_per_class=k`` draws ``k`` training examples per class with ``seed``;
``dev_shots_per_class`` draws a disjoint few-shot dev set from the rest of the training file
(:meth:`few_shot_dev`), used for model and label-word selection.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_peft.tasks.data import DEMO_TRAIN, DEMO_VAL, infer_label_names, label_key, read_records
from lightning_peft.tasks.resumable import ResumableDataLoader

__all__ = ["PromptData", "RawCollator", "few_shot_sample"]

Example = dict[str, Any]


def few_shot_sample(
    examples: Sequence[Example], shots: int, seed: int, exclude: set[int] = frozenset()
) -> list[Example]:
    """``shots`` examples per label (``example["label"]``), drawn with ``seed``, in a seeded order.

    Raises:
        ValueError: A label has fewer than ``shots`` examples.
    """
    rng = random.Random(seed)
    by_label: dict[int, list[Example]] = {}
    for ex in examples:
        if ex["index"] not in exclude:
            by_label.setdefault(int(ex["label"]), []).append(ex)
    out: list[Example] = []
    for label in sorted(by_label):
        pool = by_label[label]
        if len(pool) < shots:
            raise ValueError(f"label {label} has {len(pool)} examples, fewer than shots_per_class={shots}")
        out += rng.sample(pool, shots)
    rng.shuffle(out)
    return out


class RawCollator:
    """Batches raw examples: slot dicts stay Python, labels (and soft targets) become tensors."""

    def __call__(self, examples: list[Example]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "examples": [ex["slots"] for ex in examples],
            "labels": torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long),
            "index": torch.tensor([int(ex["index"]) for ex in examples], dtype=torch.long),
        }
        if all("targets" in ex for ex in examples) and examples and "targets" in examples[0]:
            batch["targets"] = torch.tensor([ex["targets"] for ex in examples], dtype=torch.float)
        return batch


class PromptData(L.LightningDataModule):
    """Text classification files read as raw slot dicts, for prompt-based models.

    Example::

        data = PromptData(shots_per_class=16, seed=1)      # bundled demo task, 16 examples per class
        data = PromptData("train.jsonl", "val.jsonl", slots={"premise": "s1", "hypothesis": "s2"})

    Args:
        train_path: Training CSV / JSONL; ``None`` for the bundled demo task (with its validation file).
        val_path: Validation file (``None``: none, unless the demo data is used).
        test_path: Test file.
        slots: Template slot -> column (default ``{"text": "text"}``).
        label_column: Column holding the label.
        label_names: Label order (default: sorted string labels, or ``0..max`` for integers).
        shots_per_class: Keep only this many training examples per class (few-shot), drawn with ``seed``.
        dev_shots_per_class: Size per class of the few-shot dev set drawn from the remaining training rows.
        batch_size: Examples per batch.
        seed: Seed of the few-shot draw and of the training order.
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        slots: dict[str, str] | None = None,
        label_column: str = "label",
        label_names: list[str] | None = None,
        shots_per_class: int | None = None,
        dev_shots_per_class: int | None = None,
        batch_size: int = 8,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        for name, value in (
            ("shots_per_class", shots_per_class),
            ("dev_shots_per_class", dev_shots_per_class),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None; got {value}")
        if train_path is None:
            train_path, val_path = str(DEMO_TRAIN), str(DEMO_VAL) if val_path is None else val_path
        self.paths = {"train": train_path, "val": val_path, "test": test_path}
        self.slots = dict(slots or {"text": "text"})
        self.label_column = label_column
        self.batch_size, self.seed = batch_size, seed
        self.shots, self.dev_shots = shots_per_class, dev_shots_per_class
        self._label_names = list(label_names) if label_names is not None else None
        self.datasets: dict[str, list[Example]] = {}

    @property
    def label_names(self) -> list[str]:
        """Label names by id."""
        if self._label_names is None:
            self._label_names = infer_label_names([r[self.label_column] for r in self._read("train")])
        return self._label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def examples(self, split: str) -> list[Example]:
        """All rows of a split as ``{"slots", "label", "index"}`` dicts (cached)."""
        if split not in self.datasets:
            self.datasets[split] = self._load(split)
        return self.datasets[split]

    def train_examples(self) -> list[Example]:
        """The (few-shot) training examples."""
        rows = self.examples("train")
        return few_shot_sample(rows, self.shots, self.seed) if self.shots else rows

    def few_shot_dev(self) -> list[Example]:
        """A few-shot dev set disjoint from :meth:`train_examples` (``dev_shots_per_class`` per class)."""
        if not self.dev_shots:
            raise ValueError("few_shot_dev needs dev_shots_per_class")
        used = {ex["index"] for ex in self.train_examples()}
        return few_shot_sample(self.examples("train"), self.dev_shots, self.seed + 1, exclude=used)

    def setup(self, stage: str | None = None) -> None:
        for split in ("train", "val", "test"):
            if self.paths[split] is not None:
                self.examples(split)

    def train_dataloader(self) -> DataLoader:
        """Seeded, resumable order over the (few-shot) training examples."""
        return self.loader(self.train_examples(), shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self.loader(self.examples("val")) if self.paths["val"] is not None else []

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.examples("test"))

    def loader(self, examples: Sequence[Example], shuffle: bool = False) -> DataLoader:
        """A loader over any list of examples (resumable and seeded when ``shuffle``)."""
        if shuffle:
            return ResumableDataLoader(
                list(examples),  # type: ignore[arg-type]
                seed=self.seed,
                trainer_ref=lambda: getattr(self, "trainer", None),
                batch_size=self.batch_size,
                collate_fn=RawCollator(),
            )
        return DataLoader(list(examples), batch_size=self.batch_size, collate_fn=RawCollator())  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        return {"label_names": self.label_names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._label_names = list(state_dict["label_names"])

    def _read(self, split: str) -> list[dict[str, Any]]:
        path = self.paths[split]
        if path is None:
            raise ValueError(f"no {split}_path was given")
        records = read_records(path)
        if not records:
            raise ValueError(f"{split} file {path} has no rows")
        for column in [*self.slots.values(), self.label_column]:
            if column not in records[0]:
                raise ValueError(
                    f"{split} file {path} has no column {column!r}; columns: {list(records[0])}. "
                    "Set slots={slot: column} / label_column."
                )
        return records

    def _load(self, split: str) -> list[Example]:
        index = {name: i for i, name in enumerate(self.label_names)}
        out = []
        for row, record in enumerate(self._read(split)):
            key = label_key(record[self.label_column])
            if key not in index:
                raise ValueError(f"{split} row {row + 1}: label {key!r} not in {self.label_names}")
            ex: Example = {
                "slots": {slot: str(record[col]) for slot, col in self.slots.items()},
                "label": index[key],
                "index": row,
            }
            if isinstance(record.get("targets"), list):
                ex["targets"] = [float(x) for x in record["targets"]]
            out.append(ex)
        return out


def as_examples(
    rows: Sequence[Mapping[str, Any]], slots: Mapping[str, str], label: str | None
) -> list[Example]:
    """Turn in-memory dict rows into examples (``label=None``: unlabeled, label -1)."""
    return [
        {
            "slots": {s: str(r[c]) for s, c in slots.items()},
            "label": int(r[label]) if label else -1,
            "index": i,
        }
        for i, r in enumerate(rows)
    ]
