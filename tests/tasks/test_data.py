"""TextClassificationData: file formats, label mapping, error messages, padding and shuffling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_peft.tasks import HashTokenizer, PadCollator, TextClassificationData
from lightning_peft.tasks.data import infer_label_names, label_key, read_records
from tests.tasks.helpers import TINY_VOCAB, write_rows

ROWS = [
    {"review": "A great phone.", "sentiment": "pos"},
    {"review": "Not good at all, sadly.", "sentiment": "neg"},
    {"review": "Fine.", "sentiment": "neutral"},
    {"review": "The worst purchase I have made in a very long time.", "sentiment": "neg"},
]


def make(path: Path, **kwargs) -> TextClassificationData:
    kwargs.setdefault("tokenizer", "whitespace")
    kwargs.setdefault("vocab_size", TINY_VOCAB)
    return TextClassificationData(str(path), **kwargs)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_string_labels_map_in_sorted_order(tmp_path: Path, suffix: str) -> None:
    train = write_rows(tmp_path / f"train{suffix}", ROWS)
    val = write_rows(tmp_path / f"val{suffix}", ROWS[:2])
    data = make(train, val_path=str(val), text_column="review", label_column="sentiment", batch_size=4)
    assert data.label_names == ["neg", "neutral", "pos"]
    assert data.num_labels == 3
    data.setup("fit")
    assert [e["labels"] for e in data.datasets["train"]] == [2, 0, 1, 0]
    assert [e["labels"] for e in data.datasets["val"]] == [2, 0]
    batch = next(iter(data.val_dataloader()))
    assert batch["labels"].tolist() == [2, 0]
    assert batch["input_ids"].dtype == torch.long


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_integer_labels_keep_their_ids(tmp_path: Path, suffix: str) -> None:
    rows = [{"text": f"sentence number {i}", "label": lab} for i, lab in enumerate([2, 0, 2, 1, 0])]
    data = make(write_rows(tmp_path / f"train{suffix}", rows))
    assert data.label_names == ["0", "1", "2"]
    data.setup("fit")
    assert [e["labels"] for e in data.datasets["train"]] == [2, 0, 2, 1, 0]


def test_label_helpers() -> None:
    assert label_key(3) == label_key("3") == label_key(" 3 ") == "3"
    assert label_key(True) == "True"
    assert infer_label_names([1, 3]) == ["0", "1", "2", "3"]  # ids are kept, gaps included
    assert infer_label_names(["b", "a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match=">= 0"):
        infer_label_names([-1, 0])


def test_explicit_label_names_and_unknown_label(tmp_path: Path) -> None:
    train = write_rows(tmp_path / "train.csv", ROWS)
    data = make(train, text_column="review", label_column="sentiment", label_names=["pos", "neg", "neutral"])
    data.setup("fit")
    assert [e["labels"] for e in data.datasets["train"]] == [0, 1, 2, 1]
    val = write_rows(tmp_path / "val.csv", [{"review": "meh", "sentiment": "mixed"}])
    data = make(train, val_path=str(val), text_column="review", label_column="sentiment")
    with pytest.raises(
        ValueError, match=r"val\.csv:2: val row has label 'mixed'.*\['neg', 'neutral', 'pos'\]"
    ):
        data.setup("fit")


def test_missing_file_unknown_extension_and_missing_column(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.csv"):
        make(tmp_path / "nope.csv").setup("fit")
    parquet = tmp_path / "train.parquet"
    parquet.write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown file type '\.parquet'; supported: \.csv, \.jsonl"):
        make(parquet).setup("fit")
    train = write_rows(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"no column 'text'; columns present: \['review', 'sentiment'\]"):
        make(train, label_column="sentiment").setup("fit")
    with pytest.raises(ValueError, match=r"no column 'label'; columns present"):
        _ = make(train, text_column="review").num_labels


def test_bad_jsonl_line_and_missing_value(tmp_path: Path) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"text": "ok", "label": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"train.jsonl:2: expected a JSON object"):
        make(bad).setup("fit")
    holes = write_rows(tmp_path / "holes.jsonl", [{"text": "a", "label": 0}, {"text": None, "label": 1}])
    with pytest.raises(ValueError, match=r"holes\.jsonl:2: train row has no 'text' value"):
        make(holes).setup("fit")


def test_collate_pads_to_longest_in_batch() -> None:
    tok = HashTokenizer(vocab_size=50)
    enc = tok(["one two three four", "one"], max_length=16)
    pairs = zip(enc["input_ids"], enc["attention_mask"], strict=True)
    examples = [{"input_ids": i, "attention_mask": m, "labels": k} for k, (i, m) in enumerate(pairs)]
    batch = PadCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].shape == (2, 6)  # [CLS] + 4 words + [SEP]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["input_ids"][1, 3:].tolist() == [0, 0, 0]
    assert batch["labels"].tolist() == [0, 1]


def test_dataloader_batches_are_dynamically_padded_and_truncated(tmp_path: Path) -> None:
    train = write_rows(tmp_path / "train.csv", ROWS)
    data = make(train, text_column="review", label_column="sentiment", batch_size=2, max_length=6)
    data.setup("fit")
    lengths = [b["input_ids"].shape[1] for b in data.train_dataloader()]
    assert max(lengths) == 6  # the 12-word review is truncated to max_length
    for b in data.train_dataloader():
        assert (b["input_ids"][:, -1] == HashTokenizer.sep_token_id).any()  # the longest row ends in [SEP]
        assert ((b["input_ids"] == 0) == (b["attention_mask"] == 0)).all()


def test_shuffle_is_seeded(tmp_path: Path) -> None:
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(64)]
    train = write_rows(tmp_path / "train.csv", rows)

    def order(seed: int) -> list[int]:
        data = make(train, batch_size=64, seed=seed)
        data.setup("fit")
        return next(iter(data.train_dataloader()))["input_ids"][:, 2].tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) != order(1)


def test_hash_tokenizer_is_stable_and_in_range() -> None:
    tok = HashTokenizer(vocab_size=40)
    ids = tok(["Not bad, really!"], max_length=32)["input_ids"][0]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert len(ids) == 2 + 5  # not / bad / , / really / !
    assert all(4 <= i < 40 for i in ids[1:-1])
    assert ids == HashTokenizer(vocab_size=40)(["not BAD, really!"])["input_ids"][0]  # lower-cased
    with pytest.raises(ValueError, match="vocab_size must be > 4"):
        HashTokenizer(vocab_size=4)


def test_default_is_the_bundled_demo_task_with_minilm_tokenizer() -> None:
    data = TextClassificationData(batch_size=8)
    assert data.label_names == ["negative", "positive"]
    assert data.vocab_size == 30522
    data.setup("fit")
    assert len(data.datasets["train"]) == 2000 and len(data.datasets["val"]) == 500
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert data.state_dict() == {"label_names": ["negative", "positive"]}


def test_tokenizer_folder_must_exist(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="never downloads"):
        TextClassificationData(tokenizer="bert-base-uncased")


def test_empty_label_cell_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    # A blank label would otherwise become a class of its own ("" sorts first) and shift every label id.
    path = tmp_path / "train.csv"
    path.write_text("text,label\ngood film,pos\nbad film,\nawful,neg\n")
    with pytest.raises(ValueError, match=r"train\.csv:3: train row has an empty 'label' value"):
        _ = make(path).num_labels
    spaces = tmp_path / "spaces.jsonl"
    spaces.write_text('{"text": "a", "label": "pos"}\n\n{"text": "b", "label": "  "}\n')
    with pytest.raises(ValueError, match=r"spaces\.jsonl:3: train row has an empty 'label'"):
        make(spaces).setup("fit")


def test_latin1_file_names_file_line_and_encoding_and_reads_with_the_option(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes("text,label\nnice,pos\ncaf\u00e9 cr\u00e8me,neg\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"train\.csv:3: not utf-8 text \(byte 0xe9.*encoding='latin-1'"):
        make(path).setup("fit")
    far = tmp_path / "far.csv"  # past the reader's first chunk: the line is still the file's
    far.write_bytes(("text,label\n" + "plain text,pos\n" * 2000 + "na\u00efve,neg\n").encode("latin-1"))
    with pytest.raises(ValueError, match=r"far\.csv:2002: not utf-8 text \(byte 0xef at offset 30013\)"):
        make(far).setup("fit")
    data = make(path, encoding="latin-1")
    data.setup("fit")
    assert data.label_names == ["neg", "pos"] and len(data.datasets["train"]) == 2
    assert read_records(path, encoding="latin-1")[1]["text"] == "caf\u00e9 cr\u00e8me"
