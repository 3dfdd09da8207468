"""Keep the README's numbers equal to the JSON the benchmarks wrote.

Two kinds of README content come from ``benchmarks/results/*.json``:

* generated regions, between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->`` (the
  tables of :data:`REGIONS`: attention scaling and quality, training step, early exit, few-shot), rewritten
  from the JSON by this script;
* figures in prose: each entry of :data:`FIGURES` formats a value of a JSON file the way the README writes
  it, and that text must occur in the README.

``tests/benchmarks/test_readme_numbers.py`` runs :func:`problems`, so a re-measurement that changes a
number fails the tests until the README says the new number (run this script, or edit the prose).

Run::

    .venv/bin/python benchmarks/render_readme.py            # rewrite the generated regions
    .venv/bin/python benchmarks/render_readme.py --check    # list stale regions and figures; exit 1 if any
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"

Json = dict[str, Any]


def load(name: str) -> Json:
    return json.loads((RESULTS / name).read_text())


# -- generated tables ----------------------------------------------------------------------------------
def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _attention_cell(r: Json | None, base: Json | None, is_base: bool, first_failure: bool) -> str:
    if r is None:  # older JSON records a failure only in the summary: the first length it lacks failed
        return "**failed**" if first_failure else "not run"
    if "failed" in r:
        return "**failed**"
    mem = f"{r['peak_mb']:.0f} MB{'*' if r.get('lower_bound') else ''}"
    if "median_ms" not in r:
        return f"not timed, {mem}"
    if is_base or base is None or "median_ms" not in base:
        return f"{r['median_ms'] / 1e3:.2f} s, {mem}"
    return f"{base['median_ms'] / r['median_ms']:.1f}x, {mem}"


def attention_table(data: Json) -> str:
    """Every method and length of ``attention_scaling.json``: time (fused SDPA) or speed-up over it, peak
    memory of the call, failures; the crossover length and the memory exponent."""
    lengths = data["lengths"]
    results, summary = data["results"], data["summary"]
    low, high = data.get("exponent_range", [lengths[0], lengths[-1]])
    head = [
        "method",
        *[_length(n) for n in lengths],
        "faster than SDPA from",
        f"memory exponent {_length(low)}-",
    ]
    head[-1] += _length(min(high, lengths[-1]))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, per_n in results.items():
        base, s = results["fused_sdpa"], summary[method]
        missing = [n for n in lengths if str(n) not in per_n]
        # An older JSON records a failure only in the summary: then the first missing length failed.
        recorded = any("failed" in r for r in per_n.values())
        cells = [
            _attention_cell(
                per_n.get(str(n)),
                base.get(str(n)),
                method == "fused_sdpa",
                s["failed"] and not recorded and n == missing[0],
            )
            for n in lengths
        ]
        cross = (
            "-" if method == "fused_sdpa" else (_length(s["crossover_n"]) if s["crossover_n"] else "never")
        )
        exp = "-" if s["memory_exponent"] is None else f"{s['memory_exponent']:.2f}"
        lines.append("| " + " | ".join([f"`{method}`", *cells, cross, exp]) + " |")
    return "\n".join(lines)


def _paired(num: list[float], den: list[float]) -> dict[str, float]:
    """Median and quartiles of the per-round ratios ``num[i] / den[i]`` (as ``common.paired_ratio``)."""
    ratios = sorted(a / b for a, b in zip(num, den, strict=True))
    q = statistics.quantiles(ratios, n=4)
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2]}


def _verdict(r: dict[str, float], target: float) -> str:
    return "met" if r["q3"] <= target else ("missed" if r["q1"] > target else "within noise")


def train_step_table(data: Json) -> str:
    """Every method of ``train_step.json``: median and IQR of the step, the per-round ratio to full
    fine-tuning with its quartiles (computed from the rounds' samples: both steps of a round ran back to
    back), trainable parameters; then each target with its verdict (met only if the whole IQR is)."""
    res = data["results"]
    lines = [
        "| method | median step | IQR | / full fine-tuning: per-round median (IQR) | trainable |",
        "|---|---|---|---|---|",
    ]
    for method, r in res.items():
        vs = "1.00x"
        if method != "full":
            p = _paired(r["samples_ms"], res["full"]["samples_ms"])
            vs = f"{p['median']:.2f}x ({p['q1']:.2f}-{p['q3']:.2f})"
        row = [NAMES.get(method, method), f"{r['median_ms']:.0f} ms", f"{r['iqr_ms']:.0f} ms", vs]
        lines.append("| " + " | ".join([*row, f"{r['trainable_params']:,}"]) + " |")
    lines.append("")
    for name, (num, den, target) in TARGETS.items():
        p = _paired(res[num]["samples_ms"], res[den]["samples_ms"])
        lines.append(
            f"- {name} <= {target}x: {p['median']:.3f}x per round, IQR {p['q1']:.3f}-{p['q3']:.3f}: "
            f"**{_verdict(p, target)}**"
        )
    return "\n".join(lines)


def _speedup(r: Json) -> str:
    q = r["speedup_rounds"]
    return f"{q['median']:.2f}x ({q['q1']:.2f}-{q['q3']:.2f})"


def early_exit_table(data: Json) -> str:
    """Every rule of the sweep of one ``early_exit_<task>.json``: accuracy and its drop, fraction of blocks
    run (ours, and the anchors' wait-for-the-slowest-sample at batch 32), per-round speed-ups with their
    quartiles at batch 32 and 1, and the target's verdict (lower quartile >= 1.5x at <= 1 point)."""
    (res,) = data["results"]
    full = res["full_acc"]
    lines = [
        f"| rule ({res['task']}: full model {100 * full:.1f}%) | acc | drop (points) | layers | slowest | "
        "speed-up b32 (IQR) | speed-up b1 (IQR) | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["rules"].items():
        drop = 100 * (full - r["acc"])
        q = r["b32"]["speedup_rounds"]
        if drop > 1.0:
            verdict = "too inaccurate"
        else:
            verdict = "**met**" if q["q1"] >= 1.5 else ("within noise" if q["q3"] >= 1.5 else "too slow")
        row = [
            name.replace("=", " "),
            f"{100 * r['acc']:.1f}",
            f"{drop:+.1f}",
            f"{r['layers_fraction']:.2f}",
            f"{r['anchor_slowest_sample_layers_fraction_b32']:.2f}",
            _speedup(r["b32"]),
            _speedup(r["b1"]),
            verdict,
        ]
        lines.append("| " + " | ".join(row) + " |")
    head = res["head_cost"]
    lines += [
        "",
        f"Exit accuracy by layer: {', '.join(f'{100 * a:.1f}' for a in res['exit_acc'])}; "
        "one exit head costs "
        f"{head['head_over_block']:.1%} of one block ({head['head_ms']:.2f} vs {head['block_ms']:.1f} ms).",
    ]
    return "\n".join(lines)


FEW_SHOT_METHODS = {
    "zero_shot": "zero-shot: pattern + verbalizer, no training",
    "probe": "control: logistic regression on the frozen model's last-token states",
    "headmean_lora": "head fine-tuning, mean pooling, LoRA",
    "headmean_full": "head fine-tuning, mean pooling, full",
    "head_lora": "head fine-tuning, last-token pooling, LoRA",
    "head_full": "head fine-tuning, last-token pooling, full",
    "prompt_lora": "prompt-based (PET loss), LoRA",
    "prompt_full": "prompt-based (PET loss), full",
    "demos_lora": "prompt-based + LM-BFF demonstrations, LoRA",
    "demos_full": "prompt-based + LM-BFF demonstrations, full",
    "pet_lora": "PET: 3 patterns, ensemble distilled, LoRA",
    "pet_full": "PET: 3 patterns, ensemble distilled, full",
}


def _cell(accs: list[float]) -> str:
    if not accs:
        return "not run"
    mean = 100 * statistics.mean(accs)
    std = 100 * statistics.stdev(accs) if len(accs) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f} (n={len(accs)})"


def few_shot_table(data: Json) -> str:
    """One task of ``few_shot_<task>.json``: accuracy mean ± std over seeds per method and shots per class
    (every method of the grid, "not run" where the JSON has no run), then prompt-based minus head
    fine-tuning per seed (the LM-BFF claim) and the PET ensembles' own accuracy."""
    runs = data["runs"]
    invocations = [data["meta"]["args"], *data["meta"].get("earlier_args", [])]
    shots = sorted({r["shots"] for r in runs} | {k for a in invocations for k in a["shots"]})
    lines = [
        "| method | " + " | ".join(f"{k} per class" for k in shots) + " |",
        "|---|" + "---|" * len(shots),
    ]
    for method, label in FEW_SHOT_METHODS.items():
        accs = {k: [r["acc"] for r in runs if r["method"] == method and r["shots"] == k] for k in shots}
        if method == "zero_shot":
            cells = [_cell(accs[shots[0]])] + ["(same)"] * (len(shots) - 1)
        else:
            cells = [_cell(accs[k]) for k in shots]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for k in shots:
        for tuning in ("lora", "full"):
            by_seed = {
                m: {r["seed"]: r["acc"] for r in runs if r["method"] == f"{m}_{tuning}" and r["shots"] == k}
                for m in ("prompt", "head")
            }
            seeds = sorted(set(by_seed["prompt"]) & set(by_seed["head"]))
            if not seeds:
                continue
            diffs = [100 * (by_seed["prompt"][s] - by_seed["head"][s]) for s in seeds]
            lines.append(
                f"- {k} per class, {tuning}: prompt-based minus head {statistics.mean(diffs):+.1f} points "
                f"(per seed {min(diffs):+.1f} to {max(diffs):+.1f}, "
                f"{len(seeds)} seed{'s' * (len(seeds) > 1)})"
            )
    for tuning in ("lora", "full"):
        ens = [r["ensemble_acc"] for r in runs if r["method"] == f"pet_{tuning}"]
        if ens:
            lines.append(f"- PET {tuning}: the 3-pattern ensemble itself {_cell(ens)}")
    return "\n".join(lines)


def attention_quality_table(data: Json) -> str:
    """Every variant of ``attention_quality.json`` (perplexity right after the swap and after recovery, or
    the error), then the long-context rows."""
    steps = data["settings"]["steps"]
    lines = [
        f"| variant | right after the swap | after {steps} recovery steps |",
        "|---|---|---|",
    ]
    for r in data["rows"]:
        name = r["variant"]
        if name.startswith("sliding_window"):
            keys = data.get("sliding_window_keys_per_query", r["options"]["window"] // 2)
            sinks = r["options"].get("sink_tokens", 0)
            name += f" (window {r['options']['window']}: the previous {keys} keys"
            name += f" + the first {sinks} tokens)" if sinks else ")"
        elif name == "shipped":
            name += " (control, same recovery)"
        if "error" in r:
            lines.append(f"| {name} | **failed**: {r['error'][:80]} | |")
            continue
        lines.append(f"| {name} | {r['ppl_swapped']:.1f} | {r['ppl_recovered']:.1f} |")
    contexts = data.get("contexts") or []
    if contexts:
        found = {r.get("variant") for r in contexts}
        names = [n for n in ("sliding_window", "sliding_window+sinks") if n in found]
        label = {"sliding_window": "sliding window", "sliding_window+sinks": "sliding window + 4 sinks"}
        head = "| context | shipped | " + " | ".join(f"{label[n]} (/ shipped)" for n in names) + " |"
        lines += ["", head, "|---|---|" + "---|" * len(names)]
        for n in sorted({r["context"] for r in contexts}):
            by = {r.get("variant"): r for r in contexts if r["context"] == n}
            shipped = by.get("shipped", {}).get("ppl")
            cells = []
            for name in ["shipped", *names]:
                r = by.get(name)
                if r is None or "error" in r:
                    cells.append("**failed**" + (f": {r['error'][:60]}" if r else ""))
                elif name == "shipped" or not shipped:
                    cells.append(f"{r['ppl']:.2f}")
                else:
                    cells.append(f"{r['ppl']:.2f} ({r['ppl'] / shipped:.3f})")
            lines.append(f"| {_length(n)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


NAMES = {
    "full": "full fine-tuning",
    "lora": "lightning-peft LoRA r=8 q,v",
    "peft_lora": "HF peft LoRA, same config",
    "houlsby": "Houlsby rf 16",
    "pfeiffer": "Pfeiffer rf 16",
    "bitfit": "BitFit",
}
# The training-step targets (benchmarks/train_step.py): name -> (method, reference, ratio target).
TARGETS = {
    "our LoRA / peft's LoRA": ("lora", "peft_lora", 1.0),
    "our LoRA / full fine-tuning": ("lora", "full", 0.75),
}

REGIONS: dict[str, tuple[str, Callable[[Json], str]]] = {
    "attention-table": ("attention_scaling.json", attention_table),
    "train-step-table": ("train_step.json", train_step_table),
    "early-exit-demo-table": ("early_exit_demo.json", early_exit_table),
    "few-shot-demo-table": ("few_shot_demo_sentiment.json", few_shot_table),
    "few-shot-stdlib-table": ("few_shot_stdlib_topic.json", few_shot_table),
    "attention-quality-table": ("attention_quality.json", attention_quality_table),
    "early-exit-fortunes-table": ("early_exit_fortunes.json", early_exit_table),
}


# -- figures in prose ----------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{x:.1%}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _demo(d: Json) -> list[str]:
    lora, full, probe = (d["results"][k] for k in ("lora", "full_finetuning", "logistic_regression"))
    return [
        f"{lora['trainable_params']:,} / {lora['total_params']:,} "
        f"({lora['trainable_params'] / lora['total_params']:.3%})",
        f"{_pct(lora['before']['accuracy'])} -> **{_pct(lora['after']['accuracy'])}** "
        f"(macro F1 {lora['before']['macro_f1']:.3f} -> {lora['after']['macro_f1']:.3f})",
        f"frozen MiniLM embeddings | {_pct(probe['after']['accuracy'])}",
        f"full fine-tuning (lr {full['learning_rate']:g}, {full['epochs']} epochs) | "
        f"{_pct(full['after']['accuracy'])}",
    ]


def _ddp(d: Json) -> list[str]:
    if "rounds" not in d:  # a run of the earlier protocol: one run per set-up, one after the other
        steps = len(d["results"]["single"]["samples_ms"])
        order = "the two set-ups ran one after the other"
        return [f"{d['ddp_vs_single']:.2f}x ({steps} timed steps per set-up; {order})"]
    iqr, rounds = d["ddp_vs_single_iqr"], d["rounds"]
    return [f"{d['ddp_vs_single']:.2f}x (per-round IQR {iqr:.2f}, {rounds} alternating rounds)"]


def _prompt_family(d: Json) -> list[str]:
    r = d["results"]
    names = {"prefix": "prefix tuning", "prompt": "prompt tuning", "ptuning": "P-tuning", "lora": "LoRA"}
    figures = [f"{label} {r[f'ours_{key}']['vs_peft']:.2f}x" for key, label in names.items()]
    return [*figures, f"{d['folded_prefix_inference']['folded_vs_base']:.2f}x the base"]


def _prompt_only(d: Json) -> list[str]:
    r = d["results"]
    return [
        f"{r['ours_prompt']['vs_peft']:.2f}x, IQR {r['ours_prompt']['iqr_ms']:.0f} ms on a "
        f"{r['ours_prompt']['median_ms'] / 1e3:.1f} s step"
    ]


def _ops(d: Json) -> list[str]:
    out = []
    for method in ("ours_prompt", "ours_lora"):
        c = d["operator_counts"][method]
        more = ", ".join(f"`{op.removeprefix('aten::')}` {a} vs {b}" for op, (a, b) in c["ours_more"].items())
        out += [f"{c['ours_total']:,} vs {c['peft_total']:,} ATen ops", more or "none more often"]
    return out


def _adapterdrop(d: Json) -> list[str]:
    t = d["targets"]["faster_with_lowest_5_dropped"]
    r = d["results"]
    return [
        f"{t['value']:.1%} more steps per second (step time -{t['step_time_saved']:.1%})",
        f"{r['adapterdrop_lowest_5']['trainable_params']:,} vs {r['houlsby_all_12']['trainable_params']:,}",
    ]


def _fsdp2(d: Json) -> list[str]:
    out = []
    for method in ("full", "lora"):
        r = d["results"][method]["ranks"][0]
        parts = [r["param_bytes"], r["grad_bytes"], r["optimizer_bytes"]]
        total = d["results"][method]["per_rank_total_bytes"]
        out.append(" + ".join(f"{p / 2**20:.2f}" for p in parts) + f" = {total / 2**20:.1f} MiB")
    return [*out, f"(**{d['lora_vs_full_per_rank']:.3f}x**)"]


def _checkpoint(d: Json) -> list[str]:
    r = d["results"]
    return [
        f"{r['lora']['bytes'] / 2**20:.2f} MiB vs {r['full']['bytes'] / 2**20:.1f} MiB",
        f"**{r['lora']['vs_full']:.2%}**",
    ]


def _injection(d: Json) -> list[str]:
    r = d["results"]
    return [
        f"{r['lightning_peft']['median_ms']:.0f} ms vs peft's {r['peft']['median_ms']:.0f} ms "
        f"({r['lightning_peft']['vs_peft']:.2f}x)"
    ]


def _inference(d: Json) -> list[str]:
    r = d["results"]
    return [
        f"merged LoRA / base {r['lora_merged']['vs_base']:.3f}x",
        f"unmerged LoRA / base {r['lora_unmerged']['vs_base']:.3f}x",
        f"peft unmerged / base {r['peft_unmerged']['vs_base']:.3f}x",
        f"differ by {d['merged_vs_unmerged_max_abs_diff']:.1e}",
    ]


def _adapterhub(d: Json) -> list[str]:
    return [f"{name} {count:,}" for name, count in d["trainable"].items()]


def _attention(d: Json) -> list[str]:
    parity = d.get("parity") or {}
    diff = parity.get("max_abs_diff_sliding_window_vs_local_attention")
    return [] if diff is None else [f"differ by at most {diff:.0e}"]


def _pct_over(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.1f}%"


def _attention_quality(d: Json) -> list[str]:
    rows = {r["variant"]: r for r in d["rows"]}
    base, plain, sinks = rows["shipped"], rows["sliding_window"], rows["sliding_window+sinks"]
    length = d["settings"]["length"]
    ctx = {(r["context"], r["variant"]): r["ppl"] for r in d["contexts"] if "ppl" in r}
    lengths = sorted({n for n, _ in ctx})

    def over(variant: str) -> str:
        return " / ".join(_pct_over(ctx[n, variant], ctx[n, "shipped"]) for n in lengths)

    return [
        f"({_pct_over(plain['ppl_recovered'], base['ppl_recovered'])} at {length} tokens)",
        f"{_pct_over(sinks['ppl_swapped'], base['ppl_swapped'])} right after the swap and "
        f"{_pct_over(sinks['ppl_recovered'], base['ppl_recovered'])} after recovery at {length} tokens",
        f"{over('sliding_window+sinks')} at {'/'.join(_length(n) for n in lengths)} without any training "
        f"(plain window: {over('sliding_window')})",
    ]


FIGURES: dict[str, Callable[[Json], list[str]]] = {
    "demo_baselines.json": _demo,
    "attention_quality.json": _attention_quality,
    "ddp_step.json": _ddp,
    "prompt_family.json": _prompt_family,
    "prompt_family_prompt.json": _prompt_only,
    "prompt_family_ops.json": _ops,
    "adapterdrop.json": _adapterdrop,
    "fsdp2_memory.json": _fsdp2,
    "checkpoint_size.json": _checkpoint,
    "injection.json": _injection,
    "inference.json": _inference,
    "adapterhub_counts.json": _adapterhub,
    "attention_scaling.json": _attention,
}


# -- checking and rewriting ----------------------------------------------------------------------------
def _region(name: str) -> re.Pattern[str]:
    return re.compile(rf"<!-- generated: {name} -->\n(.*?)\n?<!-- end generated: {name} -->", re.S)


def render(text: str) -> str:
    """``text`` with every generated region rewritten from its JSON (regions whose JSON is absent stay)."""
    for name, (source, fn) in REGIONS.items():
        pattern = _region(name)
        if not pattern.search(text):
            raise ValueError(f"README has no generated region {name!r}")
        if not (RESULTS / source).exists():
            continue
        block = f"<!-- generated: {name} -->\n{fn(load(source))}\n<!-- end generated: {name} -->"
        text = pattern.sub(lambda _m, block=block: block, text)
    return text


def problems(text: str) -> list[str]:
    """What in ``text`` (the README) disagrees with the JSON: stale regions and missing figures (figures
    are matched with line breaks and runs of spaces read as one space)."""
    found = []
    flat = " ".join(text.split())
    for name, (source, fn) in REGIONS.items():
        match = _region(name).search(text)
        if not (RESULTS / source).exists():
            found.append(f"region {name}: no {source}")
        elif match is None:
            found.append(f"region {name}: markers missing")
        elif match.group(1) != fn(load(source)):
            found.append(f"region {name}: differs from {source} (run benchmarks/render_readme.py)")
    for source, fn in FIGURES.items():
        if not (RESULTS / source).exists():
            found.append(f"{source}: no such result")
            continue
        missing = [f for f in fn(load(source)) if " ".join(f.split()) not in flat]
        found += [f"{source}: README lacks {figure!r}" for figure in missing]
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only report stale regions and figures")
    args = ap.parse_args(argv)
    text = README.read_text()
    if not args.check:
        text = render(text)
        README.write_text(text)
    stale = problems(text)
    for line in stale:
        print(line)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
