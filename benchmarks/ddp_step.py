"""DDP with 2 CPU processes (gloo) vs a single process: training-step time with the PEFT callback.

The same global batch (16 x 128 by default) trains LoRA r=8 (q,v) + head on all-MiniLM-L6-v2 through a real
Lightning ``Trainer``: one process with batch 16, or ``strategy="ddp"`` with 2 processes of batch 8 (each with
``torch`` limited to 1 thread, so both runs use the same 2 cores). A callback records the wall time of every
training step. The two set-ups alternate: each of ``--rounds`` rounds runs both once (as subprocesses,
alternating which goes first), so a change in the machine's load hits both; reported are the median and IQR
of the per-run medians (after warm-up steps) and of the per-round DDP/single ratio. Lightning's ddp launcher
re-executes this script for rank 1.

Run::

    .venv/bin/python benchmarks/ddp_step.py                 # 5 alternating rounds, 12 steps each, 3 warm-up
    .venv/bin/python benchmarks/ddp_step.py --quick         # smoke run (tiny model, seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    EncoderClassifier,
    add_quick_flag,
    apply_quick,
    bert_config,
    load_minilm,
    machine_info,
    print_table,
    quick,
    write_json,
)

import lightning_peft as lp
from lightning_peft.callbacks import PEFT


class StepTimer(L.Callback):
    """Wall time of each training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t0)


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = EncoderClassifier(load_minilm())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, mask, y = batch
        return F.cross_entropy(self.model(input_ids=ids, attention_mask=mask), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)


def run(devices: int, global_batch: int, seq: int, steps: int, out: Path) -> None:
    """One Trainer run; rank 0 writes its step times to ``out``."""
    torch.manual_seed(0)
    n = global_batch * steps
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randint(1000, bert_config().vocab_size if quick() else 30522, (n, seq), generator=g),
        torch.ones(n, seq, dtype=torch.long),
        torch.randint(0, 2, (n,), generator=g),
    )
    loader = DataLoader(data, batch_size=global_batch // devices)
    timer = StepTimer()
    config = lp.LoRAConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[PEFT(config), timer],
    )
    trainer.fit(Module(), loader)
    if trainer.global_rank == 0:
        out.write_text(json.dumps(timer.times))


def _iqr(values: list[float]) -> float:
    """Inter-quartile range (0 for a single value)."""
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def _run_child(devices: int, threads: int, args: argparse.Namespace, tmp: Path) -> list[float]:
    """One Trainer run in a subprocess (Lightning relaunches it per DDP rank); its timed step seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, __file__, "--child", str(devices), "--steps", str(args.steps)]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--tmp", str(tmp)]
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return json.loads((tmp / f"devices{devices}.json").read_text())[args.warmup :]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="global batch")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of one run per set-up")
    ap.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    add_quick_flag(ap)
    args = ap.parse_args(argv)
    apply_quick(args, rounds=1, steps=2, warmup=1, batch=4, seq=8)
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="lightning_peft_ddp_step_"))
    if args.child:
        run(args.child, args.batch, args.seq, args.steps, tmp / f"devices{args.child}.json")
        return {}
    tmp.mkdir(parents=True, exist_ok=True)
    setups = {"single": (1, 2), "ddp2": (2, 1)}  # name: (processes, torch threads per process)
    per_round: dict[str, list[float]] = {name: [] for name in setups}
    samples: dict[str, list[float]] = {name: [] for name in setups}
    for r in range(args.rounds):
        order = list(setups) if r % 2 == 0 else list(reversed(setups))  # alternate which runs first
        for name in order:
            times = _run_child(*setups[name], args, tmp)
            per_round[name].append(statistics.median(times) * 1e3)
            samples[name] += [t * 1e3 for t in times]
    results: dict[str, Any] = {
        name: {
            "processes": setups[name][0],
            "threads_per_process": setups[name][1],
            "median_ms": statistics.median(per_round[name]),
            "iqr_ms": _iqr(per_round[name]),
            "round_medians_ms": per_round[name],
            "samples_ms": samples[name],
        }
        for name in setups
    }
    ratios = [d / s for d, s in zip(per_round["ddp2"], per_round["single"], strict=True)]
    ratio = statistics.median(ratios)
    timed = args.steps - args.warmup
    print(f"LoRA training step, MiniLM, global batch {args.batch} x {args.seq}: {args.rounds} alternating")
    print(f"rounds of one subprocess run per set-up, {timed} timed steps each; median of the round medians")
    print_table(
        ["run", "median ms", "IQR ms", "vs single"],
        [
            [
                "single process (2 threads)",
                f"{results['single']['median_ms']:.0f}",
                f"{results['single']['iqr_ms']:.0f}",
                "1.00x",
            ],
            [
                "DDP, 2 processes (1 thread each)",
                f"{results['ddp2']['median_ms']:.0f}",
                f"{results['ddp2']['iqr_ms']:.0f}",
                f"{ratio:.2f}x (IQR {_iqr(ratios):.2f})",
            ],
        ],
    )
    payload = {
        "benchmark": "ddp_step",
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "protocol": "each round runs the single-process and the DDP set-up once each as subprocesses, "
        "alternating which goes first; per run the median step time after the warm-up steps; reported: the "
        "median and IQR over rounds, and the median and IQR of the per-round DDP/single ratio",
        "machine": machine_info(),
        "results": results,
        "ddp_vs_single": ratio,
        "ddp_vs_single_iqr": _iqr(ratios),
        "ddp_vs_single_per_round": ratios,
    }
    print(f"wrote {write_json('ddp_step', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
