"""Multi-task inference: 3 named adapters on one batch (one base forward) vs the tasks one by one (CPU).

AdapterDrop (Rücklé et al. 2021, "AdapterDrop: On the Efficiency of Adapters in Transformers") evaluates
inference for several tasks at once: every task's samples share one forward of the base and each task's
row slice goes through its own adapter at every placement (:func:`lightning_peft.multitask.run_parallel`).
The reference runs one forward per task with only its adapter active
(:func:`lightning_peft.multitask.run_sequential`); both give the same outputs (tests/test_multitask.py).
A third variant runs the parallel batch with AdapterDrop's lowest 5 layers dropped.

The model is BERT-base-shaped (12 layers, hidden 768, random weights) with three Pfeiffer adapters; the
batch is split evenly across the tasks. Short inputs show the saved per-forward overhead; at 128
tokens the forward is compute-bound and one forward of 3x the rows costs about as much as 3 forwards.
Variants run round-robin after a warm-up under
``torch.inference_mode``, summarised by their medians (``common.py``).

Run::

    .venv/bin/python benchmarks/multitask_inference.py          # 3 tasks x 2 samples, 32 and 128 tokens
    .venv/bin/python benchmarks/multitask_inference.py --rounds 2 --seqs 16   # quick check
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import BertModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    add_quick_flag,
    apply_quick,
    bert_config,
    interleaved_times,
    machine_info,
    print_table,
    random_batch,
    summarize,
    write_json,
)

import lightning_peft as lp
from lightning_peft import named
from lightning_peft.multitask import run_parallel, run_sequential
from lightning_peft.tuners.adapterdrop import drop_lowest

TASKS = ("task_a", "task_b", "task_c")


def build() -> nn.Module:
    torch.manual_seed(0)
    model = BertModel(bert_config(), add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(1)
    for name in TASKS:
        named.add_adapter(model, name, lp.BottleneckConfig(style="pfeiffer"))
        with torch.no_grad():  # trained-looking adapters (non-zero up projections)
            for p in named.adapter_state_dict(model, name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def variants(model: nn.Module, inputs: dict[str, dict[str, torch.Tensor]]) -> dict[str, Callable[[], None]]:
    def sequential() -> None:
        with torch.inference_mode():
            run_sequential(model, inputs)

    def parallel() -> None:
        with torch.inference_mode():
            run_parallel(model, inputs)

    def parallel_drop5() -> None:
        with torch.inference_mode(), drop_lowest(model, 5):
            run_parallel(model, inputs)

    return {"one_by_one": sequential, "parallel": parallel, "parallel_adapterdrop_5": parallel_drop5}


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12, help="timed round-robin rounds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--per-task", type=int, default=2, help="samples per task")
    ap.add_argument("--seqs", type=int, nargs="+", default=[32, 128], help="sequence lengths")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by neighbours)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    add_quick_flag(ap)
    args = ap.parse_args(argv)
    apply_quick(args, rounds=1, warmup=0, seqs=[8, 16])
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build()
    results: dict[str, object] = {}
    max_diff = 0.0
    for seq in args.seqs:
        inputs = {}
        for i, name in enumerate(TASKS):
            b = random_batch(args.per_task, seq, bert_config().vocab_size, seed=i)
            inputs[name] = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        with torch.inference_mode():
            seq_out, par_out = run_sequential(model, inputs), run_parallel(model, inputs)
        max_diff = max(max_diff, *(float((seq_out[n] - par_out[n]).abs().max()) for n in TASKS))

        fns = variants(model, inputs)
        times = interleaved_times(fns, rounds=args.rounds, warmup=args.warmup)
        stats = {name: summarize(t) for name, t in times.items()}
        ref = stats["one_by_one"]["median_ms"]
        rows = []
        for name in fns:
            ms = stats[name]["median_ms"]
            stats[name]["speedup_vs_one_by_one"] = ref / ms
            rows.append([name, f"{ms:.0f}", f"{stats[name]['iqr_ms']:.0f}", f"{ref / ms:.2f}x"])
        total = args.per_task * len(TASKS)
        print(f"\nMulti-task inference, BERT-base shape, {len(TASKS)} Pfeiffer adapters, {total} x {seq}")
        print_table(["variant", "median ms", "IQR ms", "speed-up"], rows)
        results[f"seq_{seq}"] = {
            name: {**stats[name], "samples_ms": [t * 1e3 for t in times[name]]} for name in fns
        }
    print(f"\nmax |parallel - one_by_one| = {max_diff:.2e}")

    payload: dict[str, object] = {
        "benchmark": "multitask_inference",
        "setup": {
            "model": "BERT-base-shaped BertModel (random init), eval, torch.inference_mode",
            "adapters": "3 named Pfeiffer bottleneck adapters (reduction 16), one per task",
            "tasks": len(TASKS),
            "per_task": args.per_task,
            "seqs": args.seqs,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "torch_threads": torch.get_num_threads(),
            "variants": {
                "one_by_one": "one forward per task (batch per_task), only its adapter active",
                "parallel": "one forward of all tasks' rows, each slice through its own adapter",
                "parallel_adapterdrop_5": "parallel with the adapters of the lowest 5 layers dropped",
            },
        },
        "machine": machine_info(),
        "max_abs_diff_parallel_vs_one_by_one": max_diff,
        "results": results,
    }
    path = write_json("multitask_inference", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
