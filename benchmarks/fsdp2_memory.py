"""FSDP2 (``fully_shard``), 2 CPU processes (gloo): per-rank bytes of parameters, gradients and AdamW state,
LoRA through the PEFT callback vs full fine-tuning.

The model has all-MiniLM-L6-v2's shape (6 layers, hidden 384, 12 heads, FFN 1536, vocab 30522), built from a
``BertConfig`` in code with random weights (byte counts do not depend on the values), plus a linear head. A
Lightning ``Trainer`` with ``ModelParallelStrategy(data_parallel_size=2)`` runs it; ``configure_model`` shards
every ``BertLayer``, then the root model (the module ``training_step`` calls, so its forward unshards the
root's parameters), as users do. LoRA is ``LoRAConfig(r=8, alpha=16, target_modules=["query", "value"],
modules_to_save=["classifier"])``, injected by the callback before the model is sharded. After the first
``AdamW.step`` each rank sums the bytes of its local shards: parameters (frozen and trainable), the gradients
present just before the step, and the optimizer state. The unsharded sizes (what one process would hold) are
listed next to them. The BERT pooler is unused by the head, so it gets no gradient and no AdamW state. Each
method runs in its own pair of processes (the script re-launches itself; Lightning re-launches it again for
rank 1).

Run::

    .venv/bin/python benchmarks/fsdp2_memory.py             # batch 4 x 64, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    EncoderClassifier,
    add_quick_flag,
    apply_quick,
    bert_config,
    machine_info,
    print_table,
    write_json,
)

import lightning_peft as lp
from lightning_peft.callbacks import PEFT

METHODS = ("full", "lora")
MINILM_SHAPE = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
)


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds for ``t``: the local shard of a DTensor, the whole tensor otherwise."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def full_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import BertModel

        torch.manual_seed(0)
        self.model = EncoderClassifier(BertModel(bert_config(**MINILM_SHAPE)))

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.encoder.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, mask, y = batch
        return F.cross_entropy(self.model(input_ids=ids, attention_mask=mask), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)


class Measure(L.Callback):
    """Per-rank bytes after the first optimizer step (gradients: just before it)."""

    def __init__(self) -> None:
        self.result: dict[str, Any] = {}

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        if "grad_bytes" not in self.result:
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.result["grad_bytes"] = sum(local_bytes(g) for g in grads)
            self.result["grad_bytes_unsharded"] = sum(full_bytes(g) for g in grads)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if "optimizer_bytes" in self.result:
            return
        params = list(pl_module.parameters())
        trainable = [p for p in params if p.requires_grad]
        states = [v for s in trainer.optimizers[0].state.values() for v in s.values() if torch.is_tensor(v)]
        self.result.update(
            params=sum(p.numel() for p in params),
            trainable_params=sum(p.numel() for p in trainable),
            param_bytes=sum(local_bytes(p) for p in params),
            param_bytes_unsharded=sum(full_bytes(p) for p in params),
            trainable_param_bytes=sum(local_bytes(p) for p in trainable),
            optimizer_bytes=sum(local_bytes(v) for v in states),
            optimizer_bytes_unsharded=sum(full_bytes(v) for v in states),
            all_dtensor=all(isinstance(p, DTensor) for p in params),
        )


def child(method: str, batch: int, seq: int, steps: int, out: Path) -> None:
    """One 2-process Trainer run; every rank writes its measurement to ``out/<method>_rank<r>.json``."""
    n = batch * 2 * steps
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randint(1000, bert_config(**MINILM_SHAPE).vocab_size, (n, seq), generator=g),
        torch.ones(n, seq, dtype=torch.long),
        torch.randint(0, 2, (n,), generator=g),
    )
    measure = Measure()
    callbacks: list[L.Callback] = [measure]
    if method == "lora":
        targets = ["query", "value"]
        callbacks.append(
            PEFT(lp.LoRAConfig(r=8, alpha=16, target_modules=targets, modules_to_save=["classifier"]))
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(Module(), DataLoader(data, batch_size=batch))
    measure.result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"{method}_rank{trainer.global_rank}.json").write_text(json.dumps(measure.result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mb(n: float) -> str:
    return f"{n / 2**20:.2f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="per-rank batch")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default="/tmp/lightning_peft_fsdp2_memory", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    add_quick_flag(ap)
    args = ap.parse_args(argv)
    apply_quick(args, steps=1, batch=2, seq=8)
    tmp = Path(args.tmp)
    if args.child:
        child(args.child, args.batch, args.seq, args.steps, tmp)
        return {}
    tmp.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for method in METHODS:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        cmd = [sys.executable, __file__, "--child", method, "--tmp", str(tmp)]
        cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        ranks = [json.loads((tmp / f"{method}_rank{r}.json").read_text()) for r in (0, 1)]
        results[method] = {"ranks": ranks}
    rows = []
    for method in METHODS:
        r0 = results[method]["ranks"][0]
        total = r0["param_bytes"] + r0["grad_bytes"] + r0["optimizer_bytes"]
        unsharded = r0["param_bytes_unsharded"] + r0["grad_bytes_unsharded"] + r0["optimizer_bytes_unsharded"]
        results[method].update(per_rank_total_bytes=total, unsharded_total_bytes=unsharded)
        rows.append(
            [
                "full fine-tuning" if method == "full" else "LoRA r=8 (q,v) + head",
                f"{r0['trainable_params']:,} / {r0['params']:,}",
                _mb(r0["param_bytes"]),
                _mb(r0["grad_bytes"]),
                _mb(r0["optimizer_bytes"]),
                _mb(total),
                _mb(unsharded),
            ]
        )
    full_total = results["full"]["per_rank_total_bytes"]
    lora_total = results["lora"]["per_rank_total_bytes"]
    print(
        f"FSDP2, 2 CPU processes, MiniLM shape, rank 0 after the first AdamW step (MiB), batch {args.batch}"
    )
    print_table(
        ["method", "trainable / total params", "params", "grads", "AdamW", "sum/rank", "sum unsharded"], rows
    )
    print(f"LoRA / full fine-tuning, per-rank sum: {lora_total / full_total:.3f}")
    payload = {
        "benchmark": "fsdp2_memory",
        "model": {"shape": "all-MiniLM-L6-v2", **MINILM_SHAPE},
        "batch_per_rank": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "processes": 2,
        "machine": machine_info(),
        "results": results,
        "lora_vs_full_per_rank": lora_total / full_total,
    }
    print(f"wrote {write_json('fsdp2_memory', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
