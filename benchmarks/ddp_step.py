"""DDP with 2 CPU processes (gloo) vs a single process: training-step time with the PEFT callback.

The same global batch (16 x 128 by default) trains LoRA r=8 (q,v) + head on all-MiniLM-L6-v2 through a real
Lightning ``Trainer``: one process with batch 16, or ``strategy="ddp"`` with 2 processes of batch 8 (each with
``torch`` limited to 1 thread, so both runs use the same 2 cores). A callback records the wall time of every
training step; the median after warm-up steps is reported. The DDP run is launched as a subprocess of this
script (Lightning's ddp launcher re-executes the script for rank 1).

Run::

    .venv/bin/python benchmarks/ddp_step.py                 # 12 steps each, 3 warm-up
    .venv/bin/python benchmarks/ddp_step.py --steps 6 --seq 32   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EncoderClassifier, load_minilm, machine_info, print_table, write_json

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
        torch.randint(1000, 30522, (n, seq), generator=g),
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="global batch")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/lightning_peft_ddp_step", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tmp = Path(args.tmp)
    if args.child:
        run(args.child, args.batch, args.seq, args.steps, tmp / f"devices{args.child}.json")
        return {}
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for devices, threads in ((1, 2), (2, 1)):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(devices),
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--tmp",
            str(tmp),
        ]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        times = json.loads((tmp / f"devices{devices}.json").read_text())[args.warmup :]
        results["single" if devices == 1 else "ddp2"] = {
            "processes": devices,
            "threads_per_process": threads,
            "median_ms": statistics.median(times) * 1e3,
            "samples_ms": [t * 1e3 for t in times],
        }
    ratio = results["ddp2"]["median_ms"] / results["single"]["median_ms"]
    timed = args.steps - args.warmup
    print(f"LoRA training step, MiniLM, global batch {args.batch} x {args.seq}, median of {timed}")
    print_table(
        ["run", "median ms", "vs single"],
        [
            ["single process (2 threads)", f"{results['single']['median_ms']:.0f}", "1.00x"],
            ["DDP, 2 processes (1 thread each)", f"{results['ddp2']['median_ms']:.0f}", f"{ratio:.2f}x"],
        ],
    )
    payload = {
        "benchmark": "ddp_step",
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": machine_info(),
        "results": results,
        "ddp_vs_single": ratio,
    }
    print(f"wrote {write_json('ddp_step', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
