"""AdapterDrop training speed: Houlsby adapters in all 12 layers vs dropped from the lowest 5 (CPU).

The model is BERT-base-shaped (12 layers, hidden 768, 12 heads, FFN 3072) with random weights, built from a
config in code. One step is forward + cross-entropy on a linear head over the [CLS] state + backward +
``AdamW.step``. Both models are built once in this process; steps are interleaved round-robin after a
warm-up and summarised by their medians (``common.interleaved_times``). The gain comes from where the
adapters are: with none in blocks 0-4 nothing below block 5 is trainable, so autograd's backward runs through
7 blocks instead of 12 (and 7 adapters run instead of 12). AdapterDrop's detaching pre-hook changes nothing
in this set-up; it matters only when something below the cut would otherwise require gradients.

Target (Rücklé et al. 2021): >= 26% faster training with the lowest 5 of 12 layers dropped.

Run::

    .venv/bin/python benchmarks/adapterdrop.py              # batch 4 x 128, 12 rounds, 1 thread
    .venv/bin/python benchmarks/adapterdrop.py --batch 16 --threads 2   # the paper-like batch (slow)
    .venv/bin/python benchmarks/adapterdrop.py --quick      # smoke run (tiny widths, seconds)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
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
from lightning_peft.tuners.adapterdrop import AdapterDropConfig

TARGET_SPEEDUP = 0.26


class Classifier(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = BertModel(bert_config(), add_pooling_layer=False)
        self.classifier = nn.Linear(self.backbone.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.classifier(hidden[:, 0])


def build(drop: int) -> nn.Module:
    model = Classifier().train()
    config = (
        AdapterDropConfig(style="houlsby", drop_layers=drop, modules_to_save=["classifier"])
        if drop
        else lp.BottleneckConfig(style="houlsby", modules_to_save=["classifier"])
    )
    lp.inject(model, config)
    return model


def make_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        loss.backward()
        opt.step()
        return float(loss)

    return step


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12, help="timed round-robin rounds (one step per model)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds")
    ap.add_argument("--batch", type=int, default=4, help="16 x 128 is ~10 s a step on 2 shared cores")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--drop", type=int, default=5, help="lowest layers without adapters")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by neighbours)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/adapterdrop.json)")
    add_quick_flag(ap)
    args = ap.parse_args(argv)
    apply_quick(args, rounds=1, warmup=0, batch=2, seq=16)
    if args.threads:
        torch.set_num_threads(args.threads)

    batch = random_batch(args.batch, args.seq, bert_config().vocab_size)
    models = {"houlsby_all_12": build(0), f"adapterdrop_lowest_{args.drop}": build(args.drop)}
    steps = {name: make_step(m, batch) for name, m in models.items()}
    times = interleaved_times(steps, rounds=args.rounds, warmup=args.warmup)
    stats = {name: summarize(t) for name, t in times.items()}

    base_name, drop_name = list(models)
    base_ms, drop_ms = stats[base_name]["median_ms"], stats[drop_name]["median_ms"]
    saved = 1.0 - drop_ms / base_ms  # fraction of the step time saved
    faster = base_ms / drop_ms - 1.0  # throughput gain (steps per second), how "x% faster" reads
    rows = [
        [
            name,
            f"{stats[name]['median_ms']:.0f}",
            f"{stats[name]['iqr_ms']:.0f}",
            f"{lp.param_summary(m).trainable:,}",
        ]
        for name, m in models.items()
    ]
    print(
        f"\nAdapterDrop training step, BERT-base shape, batch {args.batch} x {args.seq}, {args.rounds} rounds"
    )
    print_table(["model", "median ms", "IQR ms", "trainable"], rows)
    print(
        f"\ndropping the lowest {args.drop}: {faster:.1%} faster (target >= {TARGET_SPEEDUP:.0%}), "
        f"{saved:.1%} of the step time saved"
    )

    payload: dict[str, object] = {
        "benchmark": "adapterdrop_train_step",
        "setup": {
            "model": "BERT-base-shaped BertModel (random init) + linear head on [CLS]",
            "adapters": "Houlsby bottleneck, reduction 16",
            "batch": args.batch,
            "seq": args.seq,
            "drop": args.drop,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "torch_threads": torch.get_num_threads(),
            "step": "forward + cross-entropy + backward + AdamW.step",
        },
        "machine": machine_info(),
        "results": {
            name: {
                **stats[name],
                "trainable_params": lp.param_summary(m).trainable,
                "samples_ms": [t * 1e3 for t in times[name]],
            }
            for name, m in models.items()
        },
        "targets": {
            "faster_with_lowest_5_dropped": {
                "definition": "median step time without drop / with drop - 1 (throughput gain)",
                "step_time_saved": saved,
                "value": faster,
                "target": TARGET_SPEEDUP,
                "met": faster >= TARGET_SPEEDUP,
            }
        },
    }
    path = write_json("adapterdrop", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
