"""`TextClassificationData`: CSV / JSONL text classification files -> padded token batches.

Labels may be strings (mapped to ids in sorted order, exposed as ``label_names``) or integers (used as ids).
With no paths the bundled demo task (`lightning_peft.tasks.demo_data`) is used, so
``TextClassificationData()`` works offline out of the box.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_peft.tasks.pretrained import HashTokenizer, load_tokenizer
from lightning_peft.tasks.resumable import ResumableDataLoader

# The bundled demo task, written by `lightning_peft.tasks.demo_data` (not imported here so that
# ``python -m lightning_peft.tasks.demo_data`` runs cleanly).
DEMO_TRAIN = Path(__file__).resolve().parent / "data" / "demo_train.csv"
DEMO_VAL = Path(__file__).resolve().parent / "data" / "demo_val.csv"
SUPPORTED_EXTENSIONS = (".csv", ".jsonl", ".ndjson")
_INT_RE = re.compile(r"-?\d+")

Example = dict[str, Any]


def read_records(path: str | Path, encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Read a ``.csv`` (with a header row) or ``.jsonl`` / ``.ndjson`` (one JSON object per line) file.

    Args:
        path: The file.
        encoding: Text encoding of the file.

    Returns:
        One dict per row.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Unknown extension, text that is not in ``encoding``, or a JSONL line that is not a JSON
            object.
    """
    return [record for _, record in read_numbered_records(path, encoding)]


def read_numbered_records(path: str | Path, encoding: str = "utf-8") -> list[tuple[int, dict[str, Any]]]:
    """Like :func:`read_records`, with each record's line number (1-based, the header is line 1 of a CSV; a
    CSV row whose quoted text spans lines gets its last line)."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"{path}: unknown file type {path.suffix!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} (absolute: {path.resolve()})")
    try:
        with path.open(newline="", encoding=encoding) as f:
            return _read_csv(f) if path.suffix.lower() == ".csv" else _read_jsonl(f, path)
    except UnicodeDecodeError:
        raise ValueError(_decode_error(path, encoding)) from None
    except LookupError as err:
        raise ValueError(f"{path}: unknown encoding {encoding!r} ({err})") from None


def _decode_error(path: Path, encoding: str) -> str:
    """Where ``path`` stops being ``encoding`` text (the reader's error counts from its current chunk)."""
    raw = path.read_bytes()
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        return (
            f"{path}:{line}: not {encoding} text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "re-save the file as UTF-8 or give its encoding, e.g. encoding='latin-1'"
        )
    return f"{path}: not {encoding} text"


def _read_csv(f: TextIO) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(f)
    return [(reader.line_num, record) for record in reader]


def _read_jsonl(f: TextIO, path: Path) -> list[tuple[int, dict[str, Any]]]:
    records = []
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(record).__name__}")
        records.append((lineno, record))
    return records


def label_key(value: Any) -> str:
    """Canonical string form of a label: ``3`` and ``"3"`` become ``"3"``, anything else ``str()``."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    text = str(value).strip()
    return str(int(text)) if _INT_RE.fullmatch(text) else text


def infer_label_names(values: Sequence[Any]) -> list[str]:
    """Label names from raw label values.

    All-integer labels keep their ids (names ``"0" .. str(max)``); otherwise names are the distinct labels in
    sorted order.

    Args:
        values: Raw label values of the training split.

    Returns:
        ``label_names`` where ``label_names[i]`` is the label with id ``i``.

    Raises:
        ValueError: No labels, or negative integer labels.
    """
    keys = [label_key(v) for v in values]
    if not keys:
        raise ValueError("cannot infer labels from an empty training split")
    if all(_INT_RE.fullmatch(k) for k in keys):
        ids = [int(k) for k in keys]
        if min(ids) < 0:
            raise ValueError(f"integer labels must be >= 0; found {min(ids)}")
        return [str(i) for i in range(max(ids) + 1)]
    return sorted(set(keys))


class PadCollator:
    """Pads a list of tokenized examples on the right into a batch of tensors (dynamic padding).

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` and ``token_type_ids`` with 0, to the
    longest sequence in the batch; ``labels`` become a ``LongTensor``.

    Args:
        pad_token_id: Id used to pad ``input_ids``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Collate into ``{"input_ids": (B, T), "attention_mask": (B, T), ..., "labels": (B,)}``."""
        longest = max(len(e["input_ids"]) for e in examples)
        batch: dict[str, torch.Tensor] = {}
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if key not in examples[0]:
                continue
            pad = self.pad_token_id if key == "input_ids" else 0
            batch[key] = torch.tensor([e[key] + [pad] * (longest - len(e[key])) for e in examples])
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        return batch


class TextClassificationData(L.LightningDataModule):
    """Text classification data from CSV / JSONL files, tokenized once and padded per batch.

    Example::

        data = TextClassificationData()  # the bundled demo sentiment task, MiniLM tokenizer
        data = TextClassificationData("train.jsonl", "val.jsonl", text_column="review", label_column="stars")
        data = TextClassificationData(tokenizer="whitespace", vocab_size=512)  # no files: tiny test models
        model = TextClassifier(num_labels=data.num_labels)

    Args:
        train_path: Training file. ``None`` uses the bundled ``demo_train.csv`` (and ``demo_val.csv`` when
            ``val_path`` is ``None`` too).
        val_path: Validation file, or ``None`` for no validation (unless the demo data is used).
        test_path: Test file, or ``None``.
        text_column: Column / key holding the text.
        label_column: Column / key holding the label (string or integer).
        label_names: Fix the label order instead of inferring it from the training file (sorted strings, or
            ``0..max`` for integer labels). Labels not in it are an error.
        tokenizer: ``"minilm"`` / ``None`` for the bundled all-MiniLM-L6-v2 tokenizer, a local tokenizer
            folder, or ``"whitespace"`` for the in-code `HashTokenizer` (pair it with a tiny ``config`` model
            of the same ``vocab_size``). Never downloaded.
        vocab_size: Vocabulary size of the ``"whitespace"`` tokenizer (ignored otherwise).
        max_length: Maximum tokens per text, special tokens included; longer texts are truncated.
        batch_size: Examples per batch (per device).
        num_workers: DataLoader worker processes.
        seed: Seed of the training shuffle order (the same seed gives the same order every run).
        encoding: Text encoding of the files (``"utf-8"``; e.g. ``"latin-1"`` for files saved by older
            spreadsheet programs). A file that is not valid in it is an error naming the file and line.
    """

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        label_names: list[str] | None = None,
        tokenizer: str | None = "minilm",
        vocab_size: int = 1024,
        max_length: int = 128,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 42,
        encoding: str = "utf-8",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens); got {max_length}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0; got {batch_size}, {num_workers}")
        if train_path is None:
            train_path = str(DEMO_TRAIN)
            val_path = str(DEMO_VAL) if val_path is None else val_path
        self.paths: dict[str, str | None] = {"train": train_path, "val": val_path, "test": test_path}
        self.text_column = text_column
        self.label_column = label_column
        self.max_length = max_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.encoding = encoding
        self.tokenizer = HashTokenizer(vocab_size) if tokenizer == "whitespace" else load_tokenizer(tokenizer)
        self._label_names = list(label_names) if label_names is not None else None
        self.datasets: dict[str, list[Example]] = {}

    @property
    def label_names(self) -> list[str]:
        """Label names by id (reads the training labels on first use when not given)."""
        if self._label_names is None:
            records = self._read("train")
            self._label_names = infer_label_names([r[self.label_column] for _, r in records])
        return self._label_names

    @property
    def num_labels(self) -> int:
        """Number of classes, ``len(label_names)``."""
        return len(self.label_names)

    @property
    def vocab_size(self) -> int:
        """Size of the tokenizer's id space (what an in-code model's ``vocab_size`` must be at least)."""
        return self.tokenizer.vocab_size if isinstance(self.tokenizer, HashTokenizer) else len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        """Id used for padding ``input_ids``."""
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else int(pad)

    def setup(self, stage: str | None = None) -> None:
        """Read and tokenize the splits ``stage`` needs (``fit``: train + val, ``validate``, ``test``)."""
        needed = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}
        splits = needed.get(stage or "", ["train", "val", "test"])
        for split in splits:
            if split in self.datasets:
                continue
            if self.paths[split] is None:
                if stage in ("validate", "test", "predict"):
                    raise ValueError(f"stage {stage!r} needs {split}_path, which is None")
                continue
            self.datasets[split] = self._encode(split)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches in a seeded per-epoch order that resumes mid-epoch exactly."""
        if "train" not in self.datasets:
            self.setup("fit")
        return ResumableDataLoader(
            self.datasets["train"],  # type: ignore[arg-type]
            seed=self.seed,
            trainer_ref=lambda: getattr(self, "trainer", None),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=PadCollator(self.pad_token_id),
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in file order, or ``[]`` when there is no validation file."""
        return self._loader("val") if self.paths["val"] is not None else []

    def test_dataloader(self) -> DataLoader:
        """Test batches in file order."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test file's batches in file order (labels included when present)."""
        return self._loader("test")

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints so predictions map back to the same label names."""
        return {"label_names": self.label_names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the label mapping from a checkpoint."""
        self._label_names = list(state_dict["label_names"])

    def _loader(
        self, split: str, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
        return DataLoader(
            self.datasets[split],  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=PadCollator(self.pad_token_id),
        )

    def _read(self, split: str) -> list[tuple[int, dict[str, Any]]]:
        """The split's ``(line, row)`` pairs, each row with a text and a non-empty label (errors name the
        file and line)."""
        path = self.paths[split]
        assert path is not None
        records = read_numbered_records(path, self.encoding)
        if not records:
            raise ValueError(f"{split} file {path} has no rows")
        present = list(records[0][1])
        for column in (self.text_column, self.label_column):
            if column not in present:
                raise ValueError(
                    f"{split} file {path} has no column {column!r}; columns present: {present}. "
                    "Set text_column / label_column."
                )
        for line, record in records:
            for column in (self.text_column, self.label_column):
                value = record.get(column)
                if value is None or (column == self.label_column and not str(value).strip()):
                    what = "no" if value is None else "an empty"
                    raise ValueError(
                        f"{path}:{line}: {split} row has {what} {column!r} value; every row needs a text and "
                        "a label (fill it in or remove the row)"
                    )
        return records

    def _encode(self, split: str) -> list[Example]:
        records = self._read(split)
        index = {name: i for i, name in enumerate(self.label_names)}
        texts, labels = [], []
        for line, record in records:
            key = label_key(record[self.label_column])
            if key not in index:
                raise ValueError(
                    f"{self.paths[split]}:{line}: {split} row has label {key!r}, not among the training "
                    f"labels {self.label_names}; pass label_names=[...] to fix the label set"
                )
            texts.append(str(record[self.text_column]))
            labels.append(index[key])
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        return [{**{k: list(encoded[k][i]) for k in keys}, "labels": labels[i]} for i in range(len(texts))]
