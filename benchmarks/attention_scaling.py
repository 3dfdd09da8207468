"""Forward+backward time and peak memory of every registered q/k/v attention variant vs fused SDPA.

For each sequence length ``n`` (B=1, H=12, D=64, window 512 where it applies) every variant and PyTorch's
fused ``scaled_dot_product_attention`` (no mask) run one forward plus backward of ``out.sum()``:

* Time: all methods of one length are built in this process, warmed up, then timed in interleaved rounds
  (round-robin, rotating start); the median per method is reported (``common.interleaved_times``).
* Peak memory: each (method, n) runs once in a FRESH subprocess. On CPU the number is the rise of the peak
  resident set size (``VmHWM``, reset to the current resident set through ``/proc/self/clear_refs`` just
  before the call) over the resident set at that moment, after the inputs q, k, v were allocated: everything
  the call allocates (activations saved for backward, gradients, workspaces), nothing else. ``lower_bound``
  marks a run where the peak could not be reset and an earlier peak hides part of the rise. On CUDA it is
  ``torch.cuda.max_memory_allocated`` minus the allocation before the call. The child runs under an
  address-space limit (``--mem-limit-gb``), so a variant that cannot fit fails cleanly and is skipped at that
  and longer lengths (the JSON records the failure). Before the measured call the child runs the method once
  at a short length, so one-time lazy set-up is not counted as the call's memory.

Other libraries' windowed attention runs in the same process at the same shapes and window (bench extra):
HF ``LongformerSelfAttention`` (which also computes its own q/k/v projections from hidden states) and
lucidrains ``local-attention`` (``LocalAttention`` with ``exact_windowsize=True``: the same keys per query
as ours at lengths that are multiples of ``window // 2``; the JSON's ``parity`` holds the largest output
difference).

Outputs an LRA-style table, ``benchmarks/results/attention_scaling.json`` and ``.png``, the crossover length
from which each variant beats fused SDPA, and the memory exponent fitted on log(peak) vs log(n) over 2K-16K.

Example::

    python benchmarks/attention_scaling.py                           # 1K..16K, all variants (slow on CPU)
    python benchmarks/attention_scaling.py --lengths 256,512 --rounds 2 --variants sliding_window,linear
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, interleaved_times, machine_info, print_table, summarize, write_json

from lightning_peft.attention import TokenMixer, available_attention, build_attention, get_attention

BASELINE = "fused_sdpa"
EXPONENT_RANGE = (2048, 16384)
# Other libraries' sliding-window attention, measured in the same run at the same shapes and window.
HF_LONGFORMER = "hf_longformer"
LOCAL_ATTENTION = "lucidrains_local_attention"
COMPETITORS = (HF_LONGFORMER, LOCAL_ATTENTION)


def variant_options(name: str, window: int) -> dict[str, Any]:
    """Per-variant options of the benchmark: the window where it applies, defaults otherwise."""
    return {"window": window} if name == "sliding_window" else {}


def hf_longformer_step(n: int, heads: int, dim: int, window: int, device: str) -> Callable[[], None]:
    """HF ``LongformerSelfAttention`` with ``attention_window=window`` (``window // 2`` keys each side, as
    our ``sliding_window``), no global tokens. It takes hidden states and computes its own q/k/v, so its
    time and memory include three ``Linear(H*D, H*D)`` projections that the q/k/v variants do not run."""
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    config = LongformerConfig(
        hidden_size=heads * dim,
        num_attention_heads=heads,
        attention_window=[window],
        attention_probs_dropout_prob=0.0,
    )
    layer = LongformerSelfAttention(config, layer_id=0).to(device).train()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, n, heads * dim, generator=g).to(device).requires_grad_(True)  # (B, T, H*D)
    mask = torch.zeros(1, n, device=device)  # HF's layer-level mask: 0 = local attention, no padding

    def step() -> None:
        hidden.grad = None
        layer.zero_grad(set_to_none=True)
        out = layer(
            hidden,
            attention_mask=mask,
            is_index_masked=mask < 0,
            is_index_global_attn=mask > 0,
            is_global_attn=False,
        )[0]
        out.sum().backward()

    return step


def local_attention_module(dim: int, window: int) -> torch.nn.Module:
    """lucidrains ``LocalAttention``, non-causal, blocks of ``window // 2`` looking one block back and one
    forward with ``exact_windowsize=True``: each query sees the keys within ``window // 2`` positions, the
    pattern of our ``sliding_window`` (no rotary embedding, no dropout)."""
    from local_attention import LocalAttention

    return LocalAttention(
        window_size=window // 2,
        causal=False,
        look_backward=1,
        look_forward=1,
        exact_windowsize=True,
        dropout=0.0,
        autopad=True,
        dim=dim,
        use_rotary_pos_emb=False,
    )


def make_step(name: str, n: int, heads: int, dim: int, window: int, device: str) -> Callable[[], None]:
    """One forward+backward of method ``name`` at length ``n`` on fresh random inputs."""
    if name == HF_LONGFORMER:
        return hf_longformer_step(n, heads, dim, window, device)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g).to(device).requires_grad_(True) for _ in range(3))
    if name == LOCAL_ATTENTION:
        local = local_attention_module(dim, window).to(device)

        def attend() -> torch.Tensor:
            return local(q, k, v)  # (B, H, T, D) in and out
    elif name == BASELINE:

        def attend() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v)
    else:
        module = build_attention(
            name, num_heads=heads, head_dim=dim, max_length=n, **variant_options(name, window)
        ).to(device)

        def attend() -> torch.Tensor:
            return module(q, k, v)

    def step() -> None:
        for x in (q, k, v):
            x.grad = None
        attend().sum().backward()

    return step


def _status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident peak) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set peak to the current resident set (Linux >= 4.0); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_measure(name: str, n: int, heads: int, dim: int, window: int, limit_gb: float) -> dict[str, Any]:
    """Runs in a fresh process: the peak memory of one forward+backward (see the module docstring)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and limit_gb > 0:
        limit = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # One call at a short length first: one-time lazy set-up (imports, kernels) is not the call's memory.
    make_step(name, min(n, 2 * window), heads, dim, window, device)()
    step = make_step(name, n, heads, dim, window, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {
            "peak_mb": (torch.cuda.max_memory_allocated() - before) / 2**20,
            "method": "cuda",
            "lower_bound": False,
        }
    reset = _reset_peak_rss()
    start = _status_mb("VmRSS")
    peak_before = _status_mb("VmHWM")
    step()
    peak = _status_mb("VmHWM")
    return {
        "peak_mb": peak - start,
        "method": "cpu_peak_rss" if reset else "cpu_peak_rss_no_reset",
        "lower_bound": peak_before > start + 8,
    }


def measure_memory(name: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one fwd+bwd in a fresh subprocess; ``{"failed": reason}`` when the child fails."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        str(n),
        "--heads",
        str(args.heads),
        "--dim",
        str(args.dim),
    ]
    cmd += ["--window", str(args.window), "--mem-limit-gb", str(args.mem_limit_gb)]
    cmd += ["--threads", str(args.threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"no result within --child-timeout {args.child_timeout:.0f} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        print(f"  {name} n={n}: failed ({last}); skipped from here on")
        return {
            "failed": f"exit {proc.returncode} under the {args.mem_limit_gb:g} GB address-space limit: {last}"
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def times_ratio(base: list[float], samples: list[float]) -> float:
    """Median of the baseline over median of the method: the speed-up over fused SDPA."""
    return statistics.median(base) / statistics.median(samples)


def fit_exponent(points: dict[int, float]) -> float | None:
    """Least-squares slope of log(peak) on log(n) over ``EXPONENT_RANGE`` (all points if fewer than two)."""
    pts = {n: m for n, m in points.items() if m > 0}
    chosen = {n: m for n, m in pts.items() if EXPONENT_RANGE[0] <= n <= EXPONENT_RANGE[1]}
    chosen = chosen if len(chosen) >= 2 else pts
    if len(chosen) < 2:
        return None
    xs, ys = [math.log(n) for n in chosen], [math.log(m) for m in chosen.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def crossover(times: dict[int, float], base: dict[int, float]) -> int | None:
    """Smallest measured n from which the variant is faster than fused SDPA at every longer measured n."""
    ns = sorted(n for n in times if n in base)
    for i, n in enumerate(ns):
        if all(times[m] < base[m] for m in ns[i:]):
            return n
    return None


def plot(results: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, per_n in results.items():
        ns = sorted(per_n)
        style = {"color": "black", "linewidth": 2.5} if name == BASELINE else {}
        t = [(n, per_n[n]["median_ms"] / 1e3) for n in ns if "median_ms" in per_n[n]]
        m = [(n, per_n[n]["peak_mb"]) for n in ns if per_n[n].get("peak_mb", 0) > 0]
        if t:
            ax_t.plot(*zip(*t, strict=True), marker="o", label=name, **style)
        if m:
            ax_m.plot(*zip(*m, strict=True), marker="o", label=name, **style)
    for ax, title, unit in ((ax_t, "forward+backward time", "s"), (ax_m, "peak memory of the call", "MB")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length n", ylabel=unit, title=title)
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle("Attention variants vs fused SDPA (B=1, H=12, D=64)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> dict[str, Any]:
    lengths = sorted(int(x) for x in args.lengths.split(","))
    qkv_variants = [n for n in available_attention() if not issubclass(get_attention(n), TokenMixer)]
    # The "sdpa" variant without a mask is the fused baseline itself; it runs only when named.
    variants = [v for v in args.variants.split(",") if v] if args.variants else qkv_variants
    variants = variants if args.variants else [v for v in variants if v != "sdpa"]
    competitors = [c for c in args.competitors.split(",") if c]
    unknown = sorted(set(competitors) - set(COMPETITORS))
    if unknown:
        raise ValueError(f"unknown competitor(s) {unknown}; choose from {list(COMPETITORS)}")
    methods = [BASELINE, *variants, *competitors]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in methods}
    failed: set[str] = set()
    for n in lengths:
        print(f"n={n}: memory (fresh subprocess per method) ...", flush=True)
        for m in methods:
            if m in failed:
                continue
            mem = measure_memory(m, n, args)
            results[m][n] = dict(mem)
            if "failed" in mem:
                failed.add(m)
        alive = [m for m in methods if m not in failed]
        print(f"n={n}: timing {len(alive)} methods, {args.rounds} interleaved rounds ...", flush=True)
        steps = {m: make_step(m, n, args.heads, args.dim, args.window, device) for m in alive}
        times = interleaved_times(steps, rounds=args.rounds, warmup=args.warmup)
        for m, samples in times.items():
            results[m][n].update(summarize(samples))
            results[m][n]["speedup_vs_fused_sdpa"] = times_ratio(times[BASELINE], samples)
        del steps
        gc.collect()
    base = {n: r["median_ms"] for n, r in results[BASELINE].items() if "median_ms" in r}
    summary = {
        m: {
            "crossover_n": crossover(
                {n: r["median_ms"] for n, r in results[m].items() if "median_ms" in r}, base
            ),
            "memory_exponent": fit_exponent(
                {n: r["peak_mb"] for n, r in results[m].items() if "peak_mb" in r}
            ),
            "failed": m in failed,
        }
        for m in methods
    }
    return {
        "lengths": lengths,
        "results": results,
        "summary": summary,
        "device": device,
        "parity": local_attention_parity(lengths[0], args) if LOCAL_ATTENTION in methods else None,
    }


def local_attention_parity(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Largest |ours - lucidrains| over one forward at length ``n``: both attend to the same keys."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, args.heads, n, args.dim, generator=g) for _ in range(3))
    ours = build_attention("sliding_window", num_heads=args.heads, head_dim=args.dim, window=args.window)
    with torch.no_grad():
        diff = (ours(q, k, v) - local_attention_module(args.dim, args.window)(q, k, v)).abs().max().item()
    return {"n": n, "max_abs_diff_sliding_window_vs_local_attention": diff}


def report(out: dict[str, Any], args: argparse.Namespace) -> None:
    lengths, results, summary = out["lengths"], out["results"], out["summary"]
    base = results[BASELINE]
    rows = []
    for m, per_n in results.items():
        cells = []
        for n in lengths:
            r = per_n.get(n)
            if not r or "median_ms" not in r:
                cells.append("failed" if r and "failed" in r else "-")
                continue
            speed = base[n]["median_ms"] / r["median_ms"] if n in base else float("nan")
            flag = "*" if r.get("lower_bound") else ""
            cells.append(f"{r['median_ms'] / 1e3:.2f}s {speed:.1f}x {r['peak_mb']:.0f}MB{flag}")
        s = summary[m]
        exp = "-" if s["memory_exponent"] is None else f"{s['memory_exponent']:.2f}"
        rows.append([m, *cells, str(s["crossover_n"] or "-"), exp])
    print()
    print(f"fwd+bwd median time, speed-up over {BASELINE}, peak memory of the call ({out['device']})")
    print_table(["method", *[f"n={n}" for n in lengths], "beats SDPA from", "mem exponent"], rows)
    print("(* memory is a lower bound: see the module docstring)")
    payload = {
        "machine": machine_info(),
        "config": {k: v for k, v in vars(args).items() if k != "child"},
        "memory_method": "rise of the (reset) peak RSS over the RSS before one fwd+bwd, fresh subprocess per "
        "method and n (CPU); max_memory_allocated rise (CUDA)",
        "exponent_range": EXPONENT_RANGE,
        **out,
    }
    path = write_json("attention_scaling", payload, args.json)
    png = Path(args.png) if args.png else RESULTS_DIR / "attention_scaling.png"
    plot(results, png)
    print(f"wrote {path} and {png}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="comma-separated sequence lengths")
    p.add_argument(
        "--variants", default="", help="comma-separated variant names (default: all q/k/v variants)"
    )
    p.add_argument(
        "--competitors",
        default=",".join(COMPETITORS),
        help="other libraries' windowed attention measured alongside (empty string: none)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: length 64, 1 round, 2 heads")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--window", type=int, default=512, help="total window of sliding_window")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem-limit-gb", type=float, default=8.0, help="address-space limit of each memory child")
    p.add_argument("--child-timeout", type=float, default=900.0)
    p.add_argument(
        "--json", default=None, help="output JSON (default benchmarks/results/attention_scaling.json)"
    )
    p.add_argument(
        "--png", default=None, help="output plot (default benchmarks/results/attention_scaling.png)"
    )
    p.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.rounds, args.warmup, args.heads, args.dim, args.window = "64", 1, 0, 2, 16, 32
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.child:
        name, n = args.child[0], int(args.child[1])
        print(json.dumps(child_measure(name, n, args.heads, args.dim, args.window, args.mem_limit_gb)))
        return
    report(run(args), args)


if __name__ == "__main__":
    main()
