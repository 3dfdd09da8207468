"""What swapping attention into a pretrained decoder costs: held-out perplexity of SmolLM2-135M-Instruct.

For the model as shipped and for every registered attention variant that supports causal use, measure the
perplexity of held-out real text (a) right after `lightning_peft.attention.swap_attention` (no training) and
(b) after a short recovery fine-tune: LoRA on q_proj / v_proj plus the variant's own parameters, ``--steps``
AdamW steps on disjoint text of the same source. The shipped model gets the same LoRA recovery as a control,
so "after recovery" numbers compare like with like.

Text: the Python reference documentation that ships with CPython (``pydoc_data.topics``, real English prose
and code), split by topic: topics whose name hashes into the first 80 % train, the rest are held out.
Sequences are ``--length`` tokens; sliding window gets ``window=length``, a total span (Longformer's
``attention_window``) of which a causal query sees the previous half: ``length / 2`` keys, half the context.
Sliding window runs twice: plain, and with StreamingLLM's 4 attention sinks (``sink_tokens=4``: the first 4
tokens stay visible to every query; Xiao et al. 2024). Long contexts (``--contexts``, 2K/4K/8K; SmolLM2's
positions reach 8192): the shipped model and both sliding windows (half the context per query) right after
the swap, on the same ``--context-tokens`` held-out tokens.
Everything is fixed before running; every variant is reported, including failures.

    python benchmarks/attention_quality.py                 # JSON + PNG in benchmarks/results/
    python benchmarks/attention_quality.py --quick --out /tmp/aq.json   # smoke run: tiny random decoder
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_quick_flag, apply_quick, machine_info, tiny_smollm2_config, write_json

import lightning_peft as lp
from lightning_peft.attention import available_attention, get_attention, swap_attention
from lightning_peft.tasks.pretrained import resolve_pretrained_path


def token_chunks(tokenizer: Any, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)`` chunks ``(N, length)`` of the CPython reference topics, split by topic."""
    from pydoc_data.topics import topics

    parts: dict[bool, list[int]] = {True: [], False: []}
    for name in sorted(topics):
        held_out = zlib.crc32(name.encode()) % 100 >= 80
        parts[held_out] += tokenizer(topics[name] + "\n\n", add_special_tokens=False)["input_ids"]
    out = []
    for held_out in (False, True):
        ids = torch.tensor(parts[held_out])
        n = ids.numel() // length
        out.append(ids[: n * length].view(n, length))
    return out[0], out[1]


@torch.no_grad()
def perplexity(model: torch.nn.Module, chunks: torch.Tensor, batch: int) -> float:
    """``exp`` of the token-weighted mean next-token loss over ``chunks`` ``(N, T)``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch):
        ids = chunks[i : i + batch]
        logits = model(input_ids=ids).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total, count = total + loss.item(), count + ids[:, 1:].numel()
    return math.exp(total / count)


def recover(model: torch.nn.Module, train: torch.Tensor, steps: int, batch: int, lr: float) -> None:
    """LoRA (r=8, q_proj/v_proj) + the variant's parameters, ``steps`` AdamW steps on ``train``."""
    variant_params = [p for n, p in model.named_parameters() if "attention_variant" in n]
    lp.inject(model, lp.LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    for p in variant_params:
        p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        ids = train[torch.randint(len(train), (batch,), generator=g)]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


SINKS = 4  # StreamingLLM's attention sinks (Xiao et al. 2024 use 4)


def variants(length: int) -> dict[str, dict[str, Any]]:
    """Every causal-capable registered variant with its options (shipped model first), and sliding window
    again with attention sinks (row name ``sliding_window+sinks``)."""
    options = {"sliding_window": {"window": length}}
    chosen: dict[str, dict[str, Any]] = {"shipped": {}}
    for name in available_attention():
        if get_attention(name).capabilities.causal:
            chosen[name] = options.get(name, {})
    chosen["sliding_window+sinks"] = {"window": length, "sink_tokens": SINKS}
    return chosen


def run_one(base: torch.nn.Module, name: str, opts: dict, data: tuple, args: argparse.Namespace) -> dict:
    """Perplexity after the swap and after recovery for one variant; errors are recorded, not raised."""
    train, held_out = data
    row: dict[str, Any] = {"variant": name, "options": opts}
    name = name.split("+")[0]  # "sliding_window+sinks": the registered variant, with its options
    start = time.perf_counter()
    try:
        model = copy.deepcopy(base)
        if name != "shipped" and get_attention(name).capabilities.max_length:
            # Variants with per-position parameters are sized by max_position_embeddings (8192 here: 600 M
            # synthesizer logits per layer); size them for the sequences measured instead.
            model.config.max_position_embeddings = args.length
            row["max_length"] = args.length
        if name != "shipped":
            report = swap_attention(model, name, **opts)
            row["swap"] = f"{report.variant} in {len(report.modules)} layers via {report.route}"
        row["ppl_swapped"] = perplexity(model, held_out, args.batch)
        recover(model, train, args.steps, args.batch, args.lr)
        row["ppl_recovered"] = perplexity(model, held_out, args.batch)
    except Exception as err:  # report every variant, including the ones that fail
        row["error"] = f"{type(err).__name__}: {err}"
    row["seconds"] = time.perf_counter() - start
    print(row, flush=True)
    return row


def context_rows(base: torch.nn.Module, tokenizer: Any, args: argparse.Namespace) -> list[dict]:
    """Held-out perplexity at long contexts, right after the swap (no recovery: training at 8K tokens is
    out of reach on CPU): the shipped model and sliding window of total span = the context (each query sees
    the previous context / 2 keys), the same ``--context-tokens`` held-out tokens at every length."""
    rows: list[dict] = []
    limit = base.config.max_position_embeddings
    for length in args.contexts:
        if length > limit:
            rows.append({"context": length, "error": f"beyond max_position_embeddings={limit}"})
            continue
        chunks = token_chunks(tokenizer, length)[1]
        chunks = chunks[: max(1, args.context_tokens // length)]
        for name, sinks in (("shipped", 0), ("sliding_window", 0), ("sliding_window+sinks", SINKS)):
            row: dict[str, Any] = {"context": length, "variant": name, "sequences": len(chunks)}
            start = time.perf_counter()
            try:
                model = copy.deepcopy(base)
                if name != "shipped":
                    swap_attention(model, "sliding_window", window=length, sink_tokens=sinks)
                    row["keys_per_query"] = length // 2 + sinks
                row["ppl"] = perplexity(model, chunks, 1)
                del model
            except Exception as err:  # report every measurement, including failures (memory)
                row["error"] = f"{type(err).__name__}: {err}"
            row["seconds"] = time.perf_counter() - start
            print(row, flush=True)
            rows.append(row)
    return rows


def plot(rows: list[dict], out: Path) -> None:
    """Bar chart of held-out perplexity (log scale): swapped vs recovered per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "ppl_recovered" in r]
    xs = range(len(ok))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([x - 0.2 for x in xs], [r["ppl_swapped"] for r in ok], 0.4, label="right after swap")
    ax.bar([x + 0.2 for x in xs], [r["ppl_recovered"] for r in ok], 0.4, label="after LoRA recovery")
    ax.set_xticks(list(xs), [r["variant"] for r in ok], rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("SmolLM2-135M-Instruct: attention swapped in (CPython reference text)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    """Measure every variant and write ``attention_quality.json`` / ``.png``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--eval-chunks", type=int, default=8, help="held-out sequences scored")
    parser.add_argument("--steps", type=int, default=10, help="recovery steps")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--contexts",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[2048, 4096, 8192],
        help="long contexts measured swap-only (shipped vs sliding window); empty: none",
    )
    parser.add_argument("--context-tokens", type=int, default=8192, help="held-out tokens per context")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/attention_quality.json)")
    parser.add_argument("--png", help="plot path (default: the JSON path with .png)")
    add_quick_flag(parser)
    args = parser.parse_args(argv)
    # Quick: SmolLM2's tokenizer and text, a 2-layer width-32 random decoder, 1 recovery step, 2 sequences.
    apply_quick(args, length=16, eval_chunks=2, steps=1, batch=2, contexts=[16], context_tokens=32)
    if args.quick and not args.out:
        parser.error("--quick writes no results into benchmarks/results/: pass --out PATH")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    path = resolve_pretrained_path("smollm2")
    if args.quick:
        fields = tiny_smollm2_config(max_position_embeddings=args.length)
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields))
    else:
        base = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, held_out = token_chunks(tokenizer, args.length)
    held_out = held_out[: args.eval_chunks]
    rows = [run_one(base, n, o, (train, held_out), args) for n, o in variants(args.length).items()]
    payload = {
        "command": "python benchmarks/attention_quality.py " + " ".join(argv or sys.argv[1:]),
        "settings": vars(args),
        "held_out_tokens": held_out.numel(),
        "sliding_window_keys_per_query": args.length // 2,
        "rows": rows,
        "contexts": context_rows(base, tokenizer, args),
        "not_measured": "recovery fine-tuning at the long contexts (8K-token training steps on CPU)",
        "machine": machine_info(),
    }
    if args.quick:
        payload["quick"] = f"smoke run: random decoder {fields}; the numbers mean nothing"
    out = write_json("attention_quality", payload, args.out)
    print(f"wrote {out}")
    plot(rows, Path(args.png) if args.png else out.with_suffix(".png"))
    failed = [r["variant"] for r in rows if "error" in r]
    if args.quick and failed:  # a smoke run is there to catch what a library change broke
        sys.exit(f"--quick: variants failed: {failed} (errors in {out})")


if __name__ == "__main__":
    main()
