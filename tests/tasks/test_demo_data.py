"""The bundled demo data: reproducible byte-for-byte, balanced, held-out validation, not keyword-solvable."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from lightning_peft.tasks import data, demo_data


def read(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="") as f:
        return [(r["text"], r["label"]) for r in csv.DictReader(f)]


def test_regeneration_reproduces_the_shipped_files(tmp_path: Path) -> None:
    assert demo_data.main(["--out", str(tmp_path)]) == 0
    for name in (demo_data.TRAIN_FILE.name, demo_data.VAL_FILE.name):
        assert (tmp_path / name).read_bytes() == (demo_data.DATA_DIR / name).read_bytes(), name
    assert demo_data.main(["--check"]) == 0
    # the DataModule defaults point at the generated files
    assert (data.DEMO_TRAIN, data.DEMO_VAL) == (demo_data.TRAIN_FILE, demo_data.VAL_FILE)
    (tmp_path / demo_data.VAL_FILE.name).write_text("text,label\n")
    assert demo_data.main(["--check", "--out", str(tmp_path)]) == 1


def test_sizes_balance_and_disjoint_splits() -> None:
    train, val = read(demo_data.TRAIN_FILE), read(demo_data.VAL_FILE)
    assert len(train) == demo_data.N_TRAIN and len(val) == demo_data.N_VAL
    for rows in (train, val):
        assert len({t for t, _ in rows}) == len(rows)
        assert sum(label == "positive" for _, label in rows) == len(rows) // 2
    assert not {t for t, _ in train} & {t for t, _ in val}


HELD_OUT_POOLS = (
    "SUBJECTS",
    "POSITIVE_ADJ",
    "NEGATIVE_ADJ",
    "INTENSIFIERS",
    "NEGATED_INTENSIFIERS",
    "VERBS",
    "OUTCOMES",
    "OPENERS",
    "CONTRASTS",
)


def surface_forms(pool: list) -> list[str]:
    """Every string an item of a pool can put into a review (connectives without their clause slots)."""
    forms = []
    for item in pool:
        for part in item if isinstance(item, tuple) else (item,):
            if isinstance(part, str) and (text := re.sub(r"\{[ab]\}", "", part).strip(" ,;").lower()):
                forms.append(text)
    return forms


def contains(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text.lower()) is not None


def test_validation_uses_held_out_items_never_seen_in_training() -> None:
    held = [form for name in HELD_OUT_POOLS for form in surface_forms(getattr(demo_data, name)[1])]
    assert len(held) > 30
    train_text = "\n".join(t for t, _ in read(demo_data.TRAIN_FILE))
    assert [phrase for phrase in held if contains(train_text, phrase)] == []
    val = read(demo_data.VAL_FILE)
    assert [t for t, _ in val if not any(contains(t, phrase) for phrase in held)] == []


@pytest.mark.parametrize("split", ["train", "val"])
def test_keyword_spotting_fails(split: str) -> None:
    """Counting positive minus negative words from the generator's own lexicon is far from solving it."""
    positive = set(demo_data.POSITIVE_ADJ[0] + demo_data.POSITIVE_ADJ[1])
    negative = set(demo_data.NEGATIVE_ADJ[0] + demo_data.NEGATIVE_ADJ[1])
    for pools in (demo_data.VERBS, demo_data.OUTCOMES):
        for past, _, pol in pools[0] + pools[1]:
            (positive if pol else negative).add(past)
    rows = read(demo_data.TRAIN_FILE if split == "train" else demo_data.VAL_FILE)
    correct = 0
    for text, label in rows:
        lowered = text.lower()
        score = sum(lowered.count(w) for w in positive) - sum(lowered.count(w) for w in negative)
        correct += (score > 0) == (label == "positive")
    assert 0.4 < correct / len(rows) < 0.75
    negated = [label for text, label in rows if re.search(r"\b(not|never)\b", text)]
    assert 0.4 < negated.count("positive") / len(negated) < 0.6  # negators occur in both classes
    contrast = [
        t for t, _ in rows if re.search(r"\b(but|although|however|even though|yet|while|despite)\b", t)
    ]
    assert len(contrast) > 0.3 * len(rows)
