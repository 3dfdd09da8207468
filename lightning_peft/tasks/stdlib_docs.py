"""The bundled instruction-tuning task: name the Python standard-library function a docstring describes.

Source: the docstrings of Python's own standard library, read by introspection from the interpreter that runs
this script (the committed files were written by CPython 3.11). Every example is real English written by the
CPython developers, paired with the public dotted name of the function it documents::

    {"messages": [{"role": "user", "content": "Which Python standard library function does this docstring
      describe? Answer with its dotted name only.\\n\\nReturn the base name of pathname path."},
      {"role": "assistant", "content": "os.path.basename"}]}

Why the task is fair: it is reverse API lookup ("what is the function that does X?"), which a model
pretrained on code partly knows and instruction tuning must make it answer in the right form. The held-out
split shares no function (split by the answer's hash) and no docstring text (docstrings shared by two
functions are dropped, and so are docstrings that spell out the function's own name), so a held-out answer
can only come from what the model knows about the standard library plus what it learned about how modules
are organised. It is scored by exact match of the dotted name and by token F1 over its parts (``os``,
``path``, ``basename``).

Regenerate with ``python -m lightning_peft.tasks.stdlib_docs`` (deterministic for a given Python version).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import warnings
import zlib
from collections import Counter
from pathlib import Path

__all__ = ["MODULES", "QUESTION", "build_examples", "main", "split_examples"]

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_FILE = DATA_DIR / "stdlib_docs_train.jsonl"
VAL_FILE = DATA_DIR / "stdlib_docs_val.jsonl"
QUESTION = (
    "Which Python standard library function does this docstring describe? Answer with its dotted name only."
)

#: Modules whose public functions are used, in priority order: a function reachable from two of them is
#: named after the first (``os.path.join``, not ``posixpath.join``).
MODULES = (
    "os", "os.path", "shutil", "glob", "fnmatch", "tempfile", "pathlib", "string", "re", "textwrap",
    "difflib", "unicodedata", "math", "cmath", "statistics", "random", "itertools", "functools", "operator",
    "collections", "heapq", "bisect", "copy", "json", "csv", "datetime", "time", "calendar", "hashlib",
    "hmac", "secrets", "base64", "binascii", "zlib", "gzip", "bz2", "lzma", "zipfile", "tarfile", "struct",
    "codecs", "pickle", "urllib.parse", "urllib.request", "html", "shlex", "subprocess", "socket", "select",
    "signal", "threading", "asyncio", "logging", "inspect", "ast", "dis", "tokenize", "types", "typing",
    "warnings", "contextlib", "io", "sqlite3", "uuid", "ipaddress", "email.utils", "mimetypes", "platform",
    "sys", "gc", "weakref", "locale", "gettext", "stat", "filecmp", "traceback", "linecache", "reprlib",
    "colorsys", "graphlib", "dataclasses", "importlib", "importlib.util", "pkgutil", "sysconfig",
    "fileinput", "atexit", "ctypes", "unittest.mock", "doctest", "pprint", "keyword", "quopri", "plistlib",
    "zoneinfo", "tomllib", "concurrent.futures", "multiprocessing", "xml.dom.minidom",
    "xml.etree.ElementTree", "http.cookies", "wsgiref.util", "getpass", "errno", "pydoc", "site", "runpy",
    "py_compile", "compileall", "tty", "pty", "resource", "pwd", "grp",
)  # fmt: skip
_SIGNATURE_RE = re.compile(r"^\s*[\w.]+\(.*\)\s*(->.*)?$")


def _summary(obj: object) -> str | None:
    """First paragraph of the docstring on one line, or None when it is missing or only a signature."""
    doc = inspect.getdoc(obj)
    if not doc:
        return None
    paragraphs = [p for p in doc.split("\n\n") if p.strip()]
    while paragraphs and all(_SIGNATURE_RE.match(line) for line in paragraphs[0].splitlines()):
        paragraphs = paragraphs[1:]  # C functions often start with "name(args) -> type"
    if not paragraphs:
        return None
    return " ".join(paragraphs[0].split())


def _functions() -> dict[int, tuple[str, object]]:
    """``id(function) -> (dotted public name, function)`` over :data:`MODULES`, first module wins."""
    found: dict[int, tuple[str, object]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # platform-specific modules
                continue
            public = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
            for name in sorted(n for n in set(public) if not n.startswith("_")):
                obj = getattr(module, name, None)
                if (inspect.isfunction(obj) or inspect.isbuiltin(obj)) and id(obj) not in found:
                    found[id(obj)] = (f"{module_name}.{name}", obj)
    return found


def build_examples() -> list[dict[str, str]]:
    """``{"docstring", "answer"}`` pairs, one per function with a usable, unique, non-revealing docstring."""
    pairs = []
    for dotted, obj in _functions().values():
        summary = _summary(obj)
        short_name = dotted.rsplit(".", 1)[1]
        if summary is None or not 20 <= len(summary) <= 300:
            continue
        if re.search(rf"\b{re.escape(short_name)}\b", summary, flags=re.IGNORECASE):
            continue  # the docstring names the answer
        pairs.append({"docstring": summary, "answer": dotted})
    counts = Counter(p["docstring"] for p in pairs)
    return sorted((p for p in pairs if counts[p["docstring"]] == 1), key=lambda p: p["answer"])


def split_examples(pairs: list[dict[str, str]], val_percent: int = 12) -> tuple[list, list]:
    """Split by a stable hash of the answer: no function appears in both splits."""
    train, val = [], []
    for pair in pairs:
        bucket = zlib.crc32(pair["answer"].encode()) % 100
        (val if bucket < val_percent else train).append(pair)
    return train, val


def to_chat(pair: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """One chat example: the question and docstring from the user, the dotted name from the assistant."""
    return {
        "messages": [
            {"role": "user", "content": f"{QUESTION}\n\n{pair['docstring']}"},
            {"role": "assistant", "content": pair["answer"]},
        ]
    }


def main() -> None:
    """Write ``stdlib_docs_train.jsonl`` and ``stdlib_docs_val.jsonl`` next to this module."""
    train, val = split_examples(build_examples())
    # Held-out file in a hashed (module-mixed) order, so its first N lines are a fair sample of it.
    val.sort(key=lambda p: zlib.crc32(p["docstring"].encode()))
    DATA_DIR.mkdir(exist_ok=True)
    for path, rows in ((TRAIN_FILE, train), (VAL_FILE, val)):
        path.write_text("".join(json.dumps(to_chat(r), ensure_ascii=False) + "\n" for r in rows), "utf-8")
        print(f"{path}: {len(rows)} examples")


if __name__ == "__main__":
    main()
