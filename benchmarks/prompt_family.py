"""Training-step time of the prompt-family tuners next to Hugging Face ``peft`` and LoRA, and the
inference cost of a folded prefix.

One step is forward + cross-entropy + backward + ``AdamW.step`` on pretrained all-MiniLM-L6-v2 plus a
linear head. The tuner goes into the encoder (ours through ``lp.inject``, peft's through
``get_peft_model(..., task_type="FEATURE_EXTRACTION")``) with the same config, the head trains in every
method, and all steps are interleaved round-robin after a warm-up (``common.py``). Target: each of our
methods within 1.0x of peft's step time for the same method and config.

Run::

    .venv/bin/python benchmarks/prompt_family.py                         # batch 16 x 128
    .venv/bin/python benchmarks/prompt_family.py --rounds 4 --batch 4 --seq 32   # quick check
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    EncoderClassifier,
    add_quick_flag,
    apply_quick,
    bert_config,
    interleaved_times,
    load_minilm,
    machine_info,
    print_table,
    quick,
    random_batch,
    summarize,
    write_json,
)
from train_step import make_step, trainable_count

import lightning_peft as lp

TOKENS = 20
TARGET_VS_PEFT = 1.0


def _ours(method: str) -> lp.TunerConfig:
    return {
        "prefix": lambda: lp.PrefixTuningConfig(
            num_virtual_tokens=TOKENS, projection=True, encoder_hidden_size=512
        ),
        "prompt": lambda: lp.PromptTuningConfig(num_virtual_tokens=TOKENS),
        "ptuning": lambda: lp.PTuningConfig(num_virtual_tokens=TOKENS, encoder="mlp"),
        "lora": lambda: lp.LoRAConfig(r=8, alpha=16, target_modules=["query", "value"]),
        "parallel": lambda: lp.UnifiedConfig(preset="parallel"),
        "mam": lambda: lp.UnifiedConfig(preset="mam"),
    }[method]()


def _peft(method: str) -> object:
    import peft

    kw = {"task_type": "FEATURE_EXTRACTION", "num_virtual_tokens": TOKENS}
    return {
        "prefix": lambda: peft.PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=512, **kw),
        "prompt": lambda: peft.PromptTuningConfig(**kw),
        "ptuning": lambda: peft.PromptEncoderConfig(encoder_reparameterization_type="MLP", **kw),
        "lora": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]),
    }[method]()


def build(methods: list[str]) -> dict[str, nn.Module]:
    """``{name: EncoderClassifier}`` with ``ours_<m>`` and, where peft has the method, ``peft_<m>``."""
    torch.manual_seed(0)
    encoder = load_minilm()
    head = nn.Linear(encoder.config.hidden_size, 2)
    models: dict[str, nn.Module] = {}
    for method in methods:
        enc = copy.deepcopy(encoder)
        lp.inject(enc, _ours(method))
        models[f"ours_{method}"] = _with_head(enc, head)
        if method in ("prefix", "prompt", "ptuning", "lora"):
            from peft import get_peft_model

            models[f"peft_{method}"] = _with_head(get_peft_model(copy.deepcopy(encoder), _peft(method)), head)
    return models


class _PeftEncoder(nn.Module):
    """Calls a peft-wrapped encoder and returns an object with ``last_hidden_state``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> object:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def _with_head(encoder: nn.Module, head: nn.Module) -> nn.Module:
    model = EncoderClassifier(encoder if hasattr(encoder, "config") else _PeftEncoder(encoder))
    model.classifier = copy.deepcopy(head)
    return model.train()


def folded_prefix_inference(batch: dict[str, torch.Tensor], rounds: int) -> dict[str, object]:
    """Eval forward of the base encoder vs the encoder with a folded (plain) 20-token prefix."""
    base = load_minilm().eval()
    prefixed = copy.deepcopy(base)
    lp.inject(prefixed, _ours("prefix"))
    lp.fold_prefix(prefixed)
    prefixed.eval()

    def run(model: nn.Module) -> Callable[[], None]:
        def call() -> None:
            with torch.inference_mode():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

        return call

    times = interleaved_times({"base": run(base), "folded_prefix": run(prefixed)}, rounds=rounds, warmup=2)
    stats = {k: summarize(v) for k, v in times.items()}
    ratio = stats["folded_prefix"]["median_ms"] / stats["base"]["median_ms"]
    return {**stats, "folded_vs_base": ratio}


def operator_counts(models: dict[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, dict]:
    """ATen operators one training step runs, ours vs peft per method: only the ops whose counts differ.

    Timings of two equal graphs differ by machine noise; this shows whether the graphs differ at all.
    """
    from collections import Counter

    counts: dict[str, Counter] = {}
    for name, model in models.items():
        step = make_step(copy.deepcopy(model), batch)
        step()  # warm-up: lazy optimizer state
        with torch.profiler.profile() as prof:
            step()
        counts[name] = Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    out: dict[str, dict] = {}
    for name in counts:
        twin = "peft_" + name.split("_", 1)[1]
        if name.startswith("ours_") and twin in counts:
            ours, theirs = counts[name], counts[twin]
            out[name] = {
                "ours_total": sum(ours.values()),
                "peft_total": sum(theirs.values()),
                "differing": {
                    op: [ours[op], theirs[op]] for op in sorted(ours | theirs) if ours[op] != theirs[op]
                },
                # Ops we run more often than peft (or that peft does not run at all): empty iff our step's
                # operator multiset is contained in peft's.
                "ours_more": {op: [ours[op], theirs[op]] for op in sorted(ours) if ours[op] > theirs[op]},
                "ours_within_peft": all(ours[op] <= theirs[op] for op in ours),
            }
    return out


def ops_only(args: argparse.Namespace) -> dict[str, object]:
    """``--ops-only``: the operator counts of one training step (batch 2 x 32), ours vs peft, per method."""
    vocab = bert_config().vocab_size if quick() else 30522
    models = build([m.strip() for m in args.methods.split(",") if m.strip()])
    ops = operator_counts(models, random_batch(2, min(32, args.seq), vocab))
    for name, diff in ops.items():
        more = ", ".join(f"{op} {a} vs {b}" for op, (a, b) in diff["ours_more"].items()) or "none"
        print(
            f"{name}: {diff['ours_total']} ATen ops vs peft's {diff['peft_total']}; ours more often: {more}"
        )
    payload = {
        "benchmark": "prompt_family_ops",
        "model": "all-MiniLM-L6-v2 + linear head",
        "batch": 2,
        "seq": min(32, args.seq),
        "step": "zero_grad + forward + cross_entropy + backward + AdamW.step, after one warm-up step",
        "machine": machine_info(),
        "operator_counts": ops,
    }
    print(f"wrote {write_json('prompt_family_ops', payload, args.out)}")
    return payload


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--methods", default="prefix,prompt,ptuning,lora,parallel,mam")
    ap.add_argument("--out", default=None)
    ap.add_argument(
        "--ops-only",
        action="store_true",
        help="only count the ATen operators of one step, ours vs peft (JSON default: prompt_family_ops.json)",
    )
    add_quick_flag(ap)
    args = ap.parse_args(argv)
    apply_quick(args, rounds=1, warmup=0, batch=2, seq=8)
    if args.ops_only:
        return ops_only(args)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    models = build(methods)
    vocab = bert_config().vocab_size if quick() else 30522
    batch = random_batch(args.batch, args.seq, vocab)
    times = interleaved_times(
        {name: make_step(m, batch) for name, m in models.items()}, rounds=args.rounds, warmup=args.warmup
    )
    stats = {name: summarize(t) for name, t in times.items()}
    results: dict[str, dict[str, object]] = {}
    rows = []
    for name, model in models.items():
        method = name.split("_", 1)[1]
        peft_ms = stats.get(f"peft_{method}", {}).get("median_ms")
        vs_peft = stats[name]["median_ms"] / peft_ms if peft_ms and name.startswith("ours_") else None
        results[name] = {**stats[name], "vs_peft": vs_peft, "trainable_params": trainable_count(model)}
        rows.append(
            [
                name,
                f"{stats[name]['median_ms']:.1f}",
                f"{stats[name]['iqr_ms']:.1f}",
                f"{vs_peft:.2f}x" if vs_peft else "-",
                f"{trainable_count(model):,}",
            ]
        )
    inference = folded_prefix_inference(batch, rounds=max(4, args.rounds))
    ops = operator_counts(models, random_batch(2, min(32, args.seq), vocab))

    print(f"train step, MiniLM + head, batch {args.batch} x {args.seq}, {args.rounds} rounds, median")
    print_table(["method", "median ms", "IQR ms", "vs peft", "trainable"], rows)
    print(f"folded prefix inference / base: {inference['folded_vs_base']:.3f}x")
    for name, diff in ops.items():
        print(f"{name}: {diff['ours_total']} ATen ops per step vs peft's {diff['peft_total']}")
    met = {k: v["vs_peft"] <= TARGET_VS_PEFT for k, v in results.items() if v["vs_peft"] is not None}
    for name, ok in met.items():
        print(f"target {name} <= {TARGET_VS_PEFT}x peft: {'OK' if ok else 'MISSED'}")
    payload = {
        "benchmark": "prompt_family",
        "model": "all-MiniLM-L6-v2 + linear head",
        "batch": args.batch,
        "seq": args.seq,
        "rounds": args.rounds,
        "virtual_tokens": TOKENS,
        "machine": machine_info(),
        "results": results,
        "folded_prefix_inference": inference,
        "operator_counts": ops,
        "targets_met": met,
    }
    print(f"wrote {write_json('prompt_family', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
