"""Injection time: lightning-peft ``inject`` vs HF peft ``get_peft_model``, LoRA r=8 on query/value.

The model is BERT-base shaped (``BertModel(BertConfig())``, 12 layers, hidden 768, random init), built once;
every trial deep-copies it outside the timed region and times only the injection call (which includes
freezing the base and creating/initialising the 24 adapter pairs). Trials alternate between the two
libraries; the median per library is reported.

Run::

    .venv/bin/python benchmarks/injection.py
    .venv/bin/python benchmarks/injection.py --rounds 3 --layers 2   # quick check
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import BertModel

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_quick_flag, apply_quick, bert_config, machine_info, print_table, summarize, write_json

import lightning_peft as lp

TARGETS = ["query", "value"]


def inject_ours(model: nn.Module) -> nn.Module:
    lp.inject(model, lp.LoRAConfig(r=8, alpha=16, target_modules=TARGETS))
    return model


def inject_peft(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="timed trials per library (alternating)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed trials per library first")
    ap.add_argument("--layers", type=int, default=12, help="num_hidden_layers of the BERT model")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/injection.json)")
    add_quick_flag(ap)
    args = ap.parse_args(argv)
    apply_quick(args, rounds=1, warmup=0, layers=2)

    torch.manual_seed(0)
    prebuilt = BertModel(bert_config(num_hidden_layers=args.layers))
    total = sum(p.numel() for p in prebuilt.parameters())
    fns: dict[str, Callable[[nn.Module], nn.Module]] = {"lightning_peft": inject_ours, "peft": inject_peft}
    times: dict[str, list[float]] = {k: [] for k in fns}
    counts: dict[str, int] = {}
    names = list(fns)
    for i in range(args.warmup + args.rounds):
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            model = copy.deepcopy(prebuilt)  # untimed
            t0 = time.perf_counter()
            out = fns[name](model)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt)
            counts[name] = trainable(out)
            del model, out

    stats = {k: summarize(v) for k, v in times.items()}
    peft_ms = stats["peft"]["median_ms"]
    rows, results = [], {}
    for k, s in stats.items():
        ratio = s["median_ms"] / peft_ms
        results[k] = {
            **s,
            "vs_peft": ratio,
            "trainable_params": counts[k],
            "samples_ms": [t * 1e3 for t in times[k]],
        }
        rows.append([k, f"{s['median_ms']:.1f}", f"{s['min_ms']:.1f}", f"{ratio:.2f}x", f"{counts[k]:,}"])
    print(
        f"inject LoRA r=8 q,v into BertModel({args.layers} layers, {total:,} params), "
        f"{args.rounds} trials, median"
    )
    print_table(["library", "median ms", "min ms", "vs peft", "trainable"], rows)

    payload: dict[str, object] = {
        "benchmark": "injection",
        "model": f"BertModel(BertConfig(num_hidden_layers={args.layers})) random init",
        "total_params": total,
        "lora_config": {"r": 8, "alpha": 16, "target_modules": TARGETS},
        "rounds": args.rounds,
        "warmup": args.warmup,
        "timed": "inject(...) / get_peft_model(...) only; deep copy of the prebuilt model outside",
        "machine": machine_info(),
        "results": results,
    }
    path = write_json("injection", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
