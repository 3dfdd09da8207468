"""The two text-classification tasks of ``benchmarks/early_exit.py``.

* ``demo``: the bundled sentiment task (``lightning_peft/tasks/data``, 2000 train / 500 validation rows).
* ``fortunes``: topic classification of real, human-written quotations and jokes from the Debian package
  ``fortunes`` (the classic BSD/Linux ``fortune`` cookie files, ``/usr/share/games/fortunes``; install with
  ``apt-get install fortunes``). Four files are the four classes: ``computers``, ``politics``, ``science``,
  ``art``; each is cut to the size of the smallest (balanced), shuffled with a fixed seed and split 80/20.
  Nothing is downloaded at run time; without the package the task is refused with the install command.
"""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

from lightning_peft.tasks.data import DEMO_TRAIN, DEMO_VAL

__all__ = ["FORTUNES_DIR", "FORTUNE_CLASSES", "task_files"]

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNE_CLASSES = ("computers", "politics", "science", "art")


def _read_fortunes(name: str) -> list[str]:
    text = (FORTUNES_DIR / name).read_text(encoding="utf-8", errors="replace")
    items = [re.sub(r"\s+", " ", chunk).strip() for chunk in text.split("\n%\n")]
    return [t for t in items if len(t) >= 20]


def _write(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(rows)


def task_files(task: str, workdir: Path) -> tuple[str, str]:
    """``(train_csv, val_csv)`` of ``task`` (``"demo"`` or ``"fortunes"``)."""
    if task == "demo":
        return str(DEMO_TRAIN), str(DEMO_VAL)
    if task != "fortunes":
        raise ValueError(f"unknown task {task!r}; choose 'demo' or 'fortunes'")
    missing = [c for c in FORTUNE_CLASSES if not (FORTUNES_DIR / c).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the fortunes task reads {FORTUNES_DIR}/{{{','.join(FORTUNE_CLASSES)}}} from the Debian package "
            "'fortunes'; install it with `apt-get install fortunes`"
        )
    per_class = {c: _read_fortunes(c) for c in FORTUNE_CLASSES}
    n = min(len(v) for v in per_class.values())
    rng = random.Random(0)
    train: list[tuple[str, str]] = []
    val: list[tuple[str, str]] = []
    for label, items in per_class.items():
        rng.shuffle(items)
        items = items[:n]
        cut = int(0.8 * n)
        train += [(t, label) for t in items[:cut]]
        val += [(t, label) for t in items[cut:]]
    rng.shuffle(train)
    rng.shuffle(val)
    workdir.mkdir(parents=True, exist_ok=True)
    _write(workdir / "fortunes_train.csv", train)
    _write(workdir / "fortunes_val.csv", val)
    return str(workdir / "fortunes_train.csv"), str(workdir / "fortunes_val.csv")
