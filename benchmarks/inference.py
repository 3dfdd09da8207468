"""Inference latency on CPU: MiniLM eval forward, base vs LoRA unmerged vs LoRA merged.

One call is ``model(input_ids, attention_mask)`` under ``torch.inference_mode()`` on pretrained
all-MiniLM-L6-v2 (batch 16 x 128 tokens by default). The models are built once, warmed up and run
round-robin; each is summarised by its median (``common.py``). The LoRA B matrices are set to small random
values first so the merged weights really differ from the base. HF peft's unmerged LoRA with the same
weights runs alongside as a reference for the unmerged overhead (``--no-peft`` skips it).

Targets: merged / base <= 1.02 (merging adds no latency); unmerged overhead <= 10% over base.

Run::

    .venv/bin/python benchmarks/inference.py
    .venv/bin/python benchmarks/inference.py --rounds 5 --batch 4 --seq 32   # quick check
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    add_quick_flag,
    apply_quick,
    interleaved_times,
    load_minilm,
    machine_info,
    print_table,
    random_batch,
    summarize,
    write_json,
)

import lightning_peft as lp

TARGET_MERGED_VS_BASE = 1.02
TARGET_UNMERGED_OVERHEAD = 0.10


def build_models(seed: int = 0, *, with_peft: bool = True) -> dict[str, nn.Module]:
    """Base encoder, the same with LoRA r=8 on query/value (unmerged), a merged copy of that and, as a
    reference for the unmerged overhead, HF peft's unmerged LoRA with the same weights."""
    torch.manual_seed(seed)
    base = load_minilm().eval()
    unmerged = copy.deepcopy(base)
    lp.inject(unmerged, lp.LoRAConfig(r=8, alpha=16, target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in unmerged.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    merged = copy.deepcopy(unmerged)
    lp.merge(merged)
    models = {"base": base, "lora_unmerged": unmerged, "lora_merged": merged}
    if with_peft:
        from peft import LoraConfig, get_peft_model

        ref = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
        )
        ours = dict(lp.trainable_state_dict(unmerged))
        with torch.no_grad():  # same adapter weights: peft's names are ours plus a prefix and ".default"
            for name, p in ref.named_parameters():
                if "lora_" in name:
                    p.copy_(ours[name.removeprefix("base_model.model.").replace(".default", "")])
        models["peft_unmerged"] = ref
    for m in models.values():
        m.eval()
    return models


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20, help="timed round-robin rounds (one call per model)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up rounds")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--no-peft", action="store_true", help="skip the HF peft unmerged reference")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/inference.json)")
    add_quick_flag(ap)
    args = ap.parse_args(argv)
    apply_quick(args, rounds=1, warmup=0, batch=2, seq=8)

    models = build_models(with_peft=not args.no_peft)
    batch = random_batch(args.batch, args.seq, models["base"].config.vocab_size)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    with torch.inference_mode():
        out_u = models["lora_unmerged"](input_ids=ids, attention_mask=mask).last_hidden_state
        out_m = models["lora_merged"](input_ids=ids, attention_mask=mask).last_hidden_state
        max_diff = (out_u - out_m).abs().max().item()
        peft_diff: float | None = None
        if "peft_unmerged" in models:
            out_p = models["peft_unmerged"](input_ids=ids, attention_mask=mask).last_hidden_state
            peft_diff = (out_u - out_p).abs().max().item()
            print(f"ours vs peft unmerged outputs: max abs diff {peft_diff:.2e}")

        def call(model: nn.Module) -> object:
            return lambda: model(input_ids=ids, attention_mask=mask)

        fns = {k: call(m) for k, m in models.items()}
        times = interleaved_times(fns, rounds=args.rounds, warmup=args.warmup)

    stats = {k: summarize(v) for k, v in times.items()}
    base_ms = stats["base"]["median_ms"]
    rows = []
    results: dict[str, dict[str, object]] = {}
    for k, s in stats.items():
        ratio = s["median_ms"] / base_ms
        results[k] = {**s, "vs_base": ratio, "samples_ms": [t * 1e3 for t in times[k]]}
        rows.append([k, f"{s['median_ms']:.1f}", f"{s['iqr_ms']:.1f}", f"{ratio:.3f}x"])

    merged_ratio = stats["lora_merged"]["median_ms"] / base_ms
    overhead = stats["lora_unmerged"]["median_ms"] / base_ms - 1.0
    targets = {
        "merged_vs_base": {
            "value": merged_ratio,
            "target": TARGET_MERGED_VS_BASE,
            "met": merged_ratio <= TARGET_MERGED_VS_BASE,
        },
        "unmerged_overhead": {
            "value": overhead,
            "target": TARGET_UNMERGED_OVERHEAD,
            "met": overhead <= TARGET_UNMERGED_OVERHEAD,
        },
    }
    print(f"eval forward, MiniLM, batch {args.batch} x {args.seq}, {args.rounds} rounds, median")
    print_table(["model", "median ms", "IQR ms", "vs base"], rows)
    print(f"merged vs unmerged outputs: max abs diff {max_diff:.2e}")
    merged_ok = _ok(targets["merged_vs_base"])
    print(f"target merged/base: {merged_ratio:.3f}x (<= {TARGET_MERGED_VS_BASE}) {merged_ok}")
    print(
        f"target unmerged overhead: {100 * overhead:+.1f}% (<= {100 * TARGET_UNMERGED_OVERHEAD:.0f}%) "
        f"{_ok(targets['unmerged_overhead'])}"
    )

    payload: dict[str, object] = {
        "benchmark": "inference",
        "model": "all-MiniLM-L6-v2 (BertModel), LoRA r=8 alpha=16 on query,value",
        "batch": args.batch,
        "seq": args.seq,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "mode": "eval + torch.inference_mode",
        "merged_vs_unmerged_max_abs_diff": max_diff,
        "ours_vs_peft_unmerged_max_abs_diff": peft_diff,
        "machine": machine_info(),
        "results": results,
        "targets": targets,
    }
    path = write_json("inference", payload, args.out)
    print(f"wrote {path}")
    return payload


def _ok(target: dict[str, object]) -> str:
    return "OK" if target["met"] else "MISSED"


if __name__ == "__main__":
    main()
