"""The second few-shot task of ``few_shot.py``: topic of Python standard-library docstrings (real English).

Each example is the first sentence of the docstring of a public function, class or method of a module of
this Python's standard library; the label is the module group: ``text`` (string processing: ``str``,
``re``, ``textwrap``, ``difflib``, ``string``, ``codecs``, ``html``, ``unicodedata``, ``fnmatch``, ``shlex``)
or ``numbers`` (``math``, ``cmath``, ``statistics``, ``decimal``, ``fractions``, ``random``, ``numbers``,
``int``, ``float``, ``complex``). The text is written by people (CPython's documentation), so it is real
text, and it is not from the WordNet database. The split is deterministic (a hash of the sentence), sentences
are deduplicated and the classes balanced by truncation, so the task is the same on every machine running
the same Python version (recorded in the results).
"""

from __future__ import annotations

import importlib
import inspect
import re
import zlib
from typing import Any

GROUPS = {
    "text": [
        "str",
        "re",
        "textwrap",
        "difflib",
        "string",
        "codecs",
        "html",
        "unicodedata",
        "fnmatch",
        "shlex",
    ],
    "numbers": [
        "math",
        "cmath",
        "statistics",
        "decimal",
        "fractions",
        "random",
        "numbers",
        "int",
        "float",
        "complex",
    ],
}
_BUILTINS = {"str": str, "int": int, "float": float, "complex": complex}


def _members(name: str) -> list[Any]:
    obj = _BUILTINS.get(name) or importlib.import_module(name)
    out = []
    for attr, value in inspect.getmembers(obj):
        if attr.startswith("_"):
            continue
        out.append(value)
        if inspect.isclass(value) and name not in _BUILTINS:
            out += [v for a, v in inspect.getmembers(value) if not a.startswith("_")]
    return out


def first_sentence(doc: str | None) -> str | None:
    """The first sentence of a docstring, if it reads as prose (4-40 words, no signature line)."""
    if not doc:
        return None
    text = " ".join(doc.strip().split("\n\n")[0].split())
    if "(" in text.split(" ")[0] or "->" in text[:40]:  # a signature line, not prose
        return None
    sentence = re.split(r"(?<=[.!?])\s", text)[0].strip()
    words = sentence.split()
    return sentence if 4 <= len(words) <= 40 else None


def build(val_share: float = 0.3) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """``(train, val)`` rows ``{"text", "label"}``, balanced per split."""
    seen: set[str] = set()
    rows: dict[str, list[str]] = {"text": [], "numbers": []}
    for label, modules in GROUPS.items():
        for module in modules:
            for member in _members(module):
                sentence = first_sentence(inspect.getdoc(member))
                if sentence and sentence not in seen:
                    seen.add(sentence)
                    rows[label].append(sentence)
    train: list[dict[str, str]] = []
    val: list[dict[str, str]] = []
    for label, sentences in rows.items():
        for s in sorted(sentences, key=lambda s: zlib.crc32(s.encode())):
            bucket = val if zlib.crc32(("split" + s).encode()) % 100 < val_share * 100 else train
            bucket.append({"text": s, "label": label})
    return _balance(train), _balance(val)


def _balance(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    by = {lab: [r for r in rows if r["label"] == lab] for lab in GROUPS}
    n = min(len(v) for v in by.values())
    out = [r for lab in GROUPS for r in by[lab][:n]]
    return sorted(out, key=lambda r: zlib.crc32(r["text"].encode()))


if __name__ == "__main__":
    train, val = build()
    print(len(train), len(val))
    for r in train[:10]:
        print(r)
