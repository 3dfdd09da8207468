"""AdapterDrop inference speed: eval forward with adapters dropped from the lowest n = 0..11 layers (CPU).

AdapterDrop (Rücklé et al. 2021, "AdapterDrop: On the Efficiency of Adapters in Transformers"), Section 3:
removing the adapters of the lowest ``n`` layers at inference saves their adapter computation. One
BERT-base-shaped model (12 layers, hidden 768, random weights) with Houlsby adapters in every layer is
built once; ``lightning_peft.tuners.adapterdrop.drop_lowest(model, n)`` switches the lowest ``n`` off, so
every ``n`` runs the same weights. The base model without adapters is the floor, and the adapters'
share of the multiply-adds bounds what dropping can save (``expected_saving_from_macs``: ``n / 12`` of
that share). All variants run round-robin after a warm-up under ``torch.inference_mode`` and are
summarised by their medians (and minima, less sensitive to neighbours on a shared machine).

Run::

    .venv/bin/python benchmarks/adapterdrop_inference.py                    # batch 2 x 128, 10 rounds
    .venv/bin/python benchmarks/adapterdrop_inference.py --rounds 2 --seq 32   # quick check
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel

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
from lightning_peft.tuners.adapterdrop import drop_lowest


def build(adapters: bool) -> nn.Module:
    torch.manual_seed(0)
    model = BertModel(bert_config(), add_pooling_layer=False).eval()
    if adapters:
        lp.inject(model, lp.BottleneckConfig(style="houlsby"))
    return model


def adapter_mac_share(config: BertConfig, seq: int) -> float:
    """Share of an adapted forward's multiply-adds spent in the Houlsby adapters (2 per layer)."""
    d, ffn, m = config.hidden_size, config.intermediate_size, config.hidden_size // 16
    layer = 4 * d * d + 2 * d * ffn + 2 * seq * d  # q, k, v, o + FFN + scores and weighted sum, per token
    adapters = 2 * (2 * d * m)
    return adapters / (layer + adapters)


def make_forward(model: nn.Module, batch: dict[str, torch.Tensor], n: int | None) -> Callable[[], None]:
    def forward() -> None:
        with torch.inference_mode():
            if n is None:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                return
            with drop_lowest(model, n):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    return forward


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="timed round-robin rounds")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least disturbed by neighbours)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/)")
    add_quick_flag(ap)
    args = ap.parse_args(argv)
    apply_quick(args, rounds=1, warmup=0, batch=1, seq=16)
    if args.threads:
        torch.set_num_threads(args.threads)

    batch = random_batch(args.batch, args.seq, bert_config().vocab_size)
    adapted, base = build(True), build(False)
    layers = len(adapted.encoder.layer)
    fns = {f"drop_{n}": make_forward(adapted, batch, n) for n in range(layers)}
    fns["base_no_adapters"] = make_forward(base, batch, None)
    times = interleaved_times(fns, rounds=args.rounds, warmup=args.warmup)
    stats = {name: summarize(t) for name, t in times.items()}

    full, full_min = stats["drop_0"]["median_ms"], stats["drop_0"]["min_ms"]
    floor = stats["base_no_adapters"]["median_ms"]
    share = adapter_mac_share(bert_config(), args.seq)
    rows = []
    for n, name in enumerate(fns):
        ms, best = stats[name]["median_ms"], stats[name]["min_ms"]
        stats[name]["time_saved_vs_drop_0"] = 1.0 - ms / full
        stats[name]["min_time_saved_vs_drop_0"] = 1.0 - best / full_min
        expected = share * min(n, layers) / layers if name.startswith("drop_") else share
        stats[name]["expected_saving_from_macs"] = expected
        rows.append(
            [
                name,
                f"{ms:.1f}",
                f"{stats[name]['iqr_ms']:.1f}",
                f"{1.0 - ms / full:+.1%}",
                f"{1.0 - best / full_min:+.1%}",
                f"{expected:+.1%}",
            ]
        )
    print(f"\nAdapterDrop inference, BERT-base shape, batch {args.batch} x {args.seq}, {args.rounds} rounds")
    print_table(["variant", "median ms", "IQR ms", "saved (median)", "saved (min)", "expected (MACs)"], rows)
    print(
        f"\nadapter overhead with all 12: {full / floor - 1.0:+.1%} over the base model (MACs: {share:.1%})"
    )

    payload: dict[str, object] = {
        "benchmark": "adapterdrop_inference",
        "setup": {
            "model": "BERT-base-shaped BertModel (random init), eval, torch.inference_mode",
            "adapters": "Houlsby bottleneck in all 12 layers, reduction 16; drop_lowest(model, n)",
            "batch": args.batch,
            "seq": args.seq,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "torch_threads": torch.get_num_threads(),
        },
        "machine": machine_info(),
        "results": {name: {**stats[name], "samples_ms": [t * 1e3 for t in times[name]]} for name in fns},
        "adapter_overhead_all_12_vs_base": full / floor - 1.0,
        "adapter_mac_share_all_12": share,
        "note": "dropping n of 12 layers can save at most n/12 of the adapters' share of the work "
        "(expected_saving_from_macs); on a shared, loaded CPU that is below the timing noise",
    }
    path = write_json("adapterdrop_inference", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
