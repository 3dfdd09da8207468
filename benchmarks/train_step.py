"""Training-step time on CPU: full fine-tuning vs lightning-peft tuners vs HF peft LoRA.

One step is forward + cross-entropy + backward + ``AdamW.step`` on pretrained all-MiniLM-L6-v2 plus a
linear head (batch 16 x 128 tokens by default). Every model is built once in this process, all steps are
interleaved round-robin after a warm-up, and each method is summarised by its median (``common.py``).
The head trains in every method (``modules_to_save=["classifier"]`` for the tuners and for peft).

Targets: our LoRA <= 1.0x peft's LoRA with the same config; LoRA <= 0.75x full fine-tuning.

Run::

    .venv/bin/python benchmarks/train_step.py                  # default size
    .venv/bin/python benchmarks/train_step.py --rounds 5 --batch 4 --seq 32   # quick check
    .venv/bin/python benchmarks/train_step.py --profile        # also profile our LoRA vs peft's
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    EncoderClassifier,
    add_quick_flag,
    apply_quick,
    interleaved_times,
    load_minilm,
    machine_info,
    paired_ratio,
    print_table,
    random_batch,
    summarize,
    target_verdict,
    write_json,
)

import lightning_peft as lp

LORA_TARGETS = ["query", "value"]
TARGET_LORA_VS_PEFT = 1.0
TARGET_LORA_VS_FULL = 0.75


def build_models(methods: list[str], seed: int = 0) -> dict[str, nn.Module]:
    """One model per method, all with the same pretrained encoder and the same initial head."""
    torch.manual_seed(seed)
    base = EncoderClassifier(load_minilm())
    models: dict[str, nn.Module] = {}
    for method in methods:
        model = copy.deepcopy(base)
        if method == "full":
            pass
        elif method == "lora":
            lp.inject(
                model,
                lp.LoRAConfig(r=8, alpha=16, target_modules=LORA_TARGETS, modules_to_save=["classifier"]),
            )
        elif method == "peft_lora":
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, modules_to_save=["classifier"])
            model = get_peft_model(model, cfg)
        elif method in ("houlsby", "pfeiffer"):
            lp.inject(
                model, lp.BottleneckConfig(style=method, reduction_factor=16, modules_to_save=["classifier"])
            )
        elif method == "bitfit":
            lp.inject(model, lp.BitFitConfig(modules_to_save=["classifier"]))
        else:
            raise ValueError(f"unknown method {method!r}")
        model.train()
        models[method] = model
    return models


def make_step(model: nn.Module, batch: dict[str, torch.Tensor], lr: float = 1e-4) -> Callable[[], None]:
    """A closure doing one full optimisation step of ``model`` on ``batch``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        loss.backward()
        opt.step()

    return step


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def profile_lora(
    models: dict[str, nn.Module], batch: dict[str, torch.Tensor], steps: int = 3
) -> dict[str, str]:
    """Per-operator CPU profile of one training step of our LoRA and peft's (after a warm-up step)."""
    from torch.profiler import ProfilerActivity, profile

    tables: dict[str, str] = {}
    for name in ("lora", "peft_lora"):
        if name not in models:
            continue
        step = make_step(models[name], batch)
        step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                step()
        table = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=25
        )
        tables[name] = table
        print(f"\n=== profile: {name} ({steps} steps, by self CPU time) ===\n{table}")
    return tables


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The README reports the run of these defaults (10 rounds, all six methods: ``make bench``).
    ap.add_argument("--rounds", type=int, default=10, help="timed round-robin rounds (one step per method)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed warm-up rounds")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--methods",
        default="full,lora,peft_lora,houlsby,pfeiffer,bitfit",
        help="comma-separated subset of full,lora,peft_lora,houlsby,pfeiffer,bitfit",
    )
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table for the LoRAs")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_step.json)")
    add_quick_flag(ap)
    args = ap.parse_args(argv)
    apply_quick(args, rounds=1, warmup=0, batch=2, seq=8)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    models = build_models(methods)
    vocab = next(m.config.vocab_size for m in models[methods[0]].modules() if hasattr(m, "config"))
    batch = random_batch(args.batch, args.seq, vocab)
    steps = {m: make_step(models[m], batch) for m in methods}
    times = interleaved_times(steps, rounds=args.rounds, warmup=args.warmup)

    stats = {m: summarize(times[m]) for m in methods}
    full = stats.get("full", {}).get("median_ms")
    results: dict[str, dict[str, object]] = {}
    rows = []
    for m in methods:
        med = stats[m]["median_ms"]
        vs_full = med / full if full else None
        results[m] = {
            **stats[m],
            "vs_full": vs_full,
            "trainable_params": trainable_count(models[m]),
            "samples_ms": [t * 1e3 for t in times[m]],
        }
        rows.append(
            [
                m,
                f"{med:.1f}",
                f"{stats[m]['iqr_ms']:.1f}",
                f"{vs_full:.2f}x" if vs_full else "-",
                f"{trainable_count(models[m]):,}",
            ]
        )

    # Ratios per round (both steps of a round ran back to back); a target counts as met only when the
    # whole IQR of the per-round ratio is at or below it.
    for m in methods:
        if "full" in times and m != "full":
            results[m]["vs_full_per_round"] = paired_ratio(times[m], times["full"])
    targets: dict[str, dict[str, object]] = {}
    for name, other, target in (
        ("lora_vs_peft", "peft_lora", TARGET_LORA_VS_PEFT),
        ("lora_vs_full", "full", TARGET_LORA_VS_FULL),
    ):
        if "lora" in times and other in times:
            ratio = paired_ratio(times["lora"], times[other])
            verdict = target_verdict(ratio, target)
            targets[name] = {
                "value": ratio["median"],
                "per_round": ratio,
                "target": target,
                "verdict": verdict,
                "met": verdict == "met",
            }

    print(f"train step, MiniLM + head, batch {args.batch} x {args.seq}, {args.rounds} rounds, median")
    print_table(["method", "median ms", "IQR ms", "vs full", "trainable"], rows)
    for name, t in targets.items():
        r = t["per_round"]
        iqr = f"IQR {r['q1']:.3f}-{r['q3']:.3f}"
        print(f"target {name}: {t['value']:.3f}x, {iqr} (<= {t['target']}x): {t['verdict']}")

    payload: dict[str, object] = {
        "benchmark": "train_step",
        "model": "all-MiniLM-L6-v2 + linear head",
        "batch": args.batch,
        "seq": args.seq,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "step": "zero_grad + forward + cross_entropy + backward + AdamW.step",
        "machine": machine_info(),
        "results": results,
        "targets": targets,
    }
    if args.profile:
        payload["profile"] = profile_lora(models, batch)
    path = write_json("train_step", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
