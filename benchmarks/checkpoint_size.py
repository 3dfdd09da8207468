"""Checkpoint size on disk: full fine-tuning vs the ``PEFT`` callback's adapter-only checkpoints.

A real (tiny) Lightning run per method: all-MiniLM-L6-v2 plus a linear ``classifier`` trained for two
steps on random token data with ``ModelCheckpoint`` (optimizer state included, the default). Full
fine-tuning has no callback; the PEFT run uses ``PEFT(LoRAConfig(r=8, alpha=16, target_modules=["query",
"value"], modules_to_save=["classifier"]))``, which trims the checkpoint's ``state_dict`` to the adapter and
head. The ``.ckpt`` files are measured with ``os.path.getsize`` and opened to split the bytes into weights
and optimizer state.

Target: LoRA checkpoint <= 2% of the full fine-tuning checkpoint.

Run::

    .venv/bin/python benchmarks/checkpoint_size.py
    .venv/bin/python benchmarks/checkpoint_size.py --batch 2 --seq 16   # quick check
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    EncoderClassifier,
    add_quick_flag,
    apply_quick,
    load_minilm,
    machine_info,
    print_table,
    random_batch,
    write_json,
)

from lightning_peft import LoRAConfig
from lightning_peft.callbacks import PEFT

TARGET_LORA_VS_FULL = 0.02


class Classifier(L.LightningModule):
    """MiniLM + linear head; optimises whatever requires grad (the PEFT callback freezes before this runs)."""

    def __init__(self, lr: float = 1e-4) -> None:
        super().__init__()
        net = EncoderClassifier(load_minilm()).train()  # from_pretrained returns eval mode
        self.encoder, self.classifier = net.encoder, net.classifier
        self.lr = lr

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.classifier(hidden[:, 0])

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        ids, mask, labels = batch
        return F.cross_entropy(self(ids, mask), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors nested in ``obj`` (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def run(method: str, root: Path, *, steps: int, batch: int, seq: int) -> dict[str, Any]:
    """Train ``method`` for ``steps`` steps under ``root``; measure the checkpoint it leaves."""
    torch.manual_seed(0)
    model = Classifier()
    data = random_batch(batch * steps, seq, model.encoder.config.vocab_size)
    loader = DataLoader(
        TensorDataset(data["input_ids"], data["attention_mask"], data["labels"]), batch_size=batch
    )
    ckpt_dir = root / method / "checkpoints"
    callbacks: list[Callback] = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=steps)]
    if method == "lora":
        config = LoRAConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
        callbacks.append(PEFT(config))
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root / method),
        callbacks=callbacks,
    )
    trainer.fit(model, loader)
    files = sorted(ckpt_dir.glob("*.ckpt"))
    if not files:
        raise RuntimeError(f"{method}: ModelCheckpoint wrote nothing under {ckpt_dir}")
    path = files[-1]
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "state_dict_keys": len(ckpt["state_dict"]),
        "state_dict_bytes": tensor_bytes(ckpt["state_dict"]),
        "optimizer_bytes": tensor_bytes(ckpt.get("optimizer_states", [])),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "global_step": ckpt.get("global_step"),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", "--rounds", dest="steps", type=int, default=2, help="training steps per run")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/checkpoint_size.json)")
    add_quick_flag(ap)
    args = ap.parse_args(argv)
    apply_quick(args, steps=1, batch=2, seq=8)

    with tempfile.TemporaryDirectory(prefix="lp_ckpt_bench_") as tmp:
        results = {
            m: run(m, Path(tmp), steps=args.steps, batch=args.batch, seq=args.seq) for m in ("full", "lora")
        }

    full_bytes = results["full"]["bytes"]
    rows = []
    for m, r in results.items():
        r["vs_full"] = r["bytes"] / full_bytes
        rows.append(
            [
                m,
                f"{r['bytes'] / 2**20:.2f}",
                f"{r['state_dict_bytes'] / 2**20:.2f}",
                f"{r['optimizer_bytes'] / 2**20:.2f}",
                str(r["state_dict_keys"]),
                f"{r['trainable_params']:,}",
                f"{100 * r['vs_full']:.2f}%",
            ]
        )
    ratio = results["lora"]["vs_full"]
    targets = {
        "lora_vs_full": {"value": ratio, "target": TARGET_LORA_VS_FULL, "met": ratio <= TARGET_LORA_VS_FULL}
    }
    print(f"checkpoint after {args.steps} steps (ModelCheckpoint, with optimizer state), MiniLM + head")
    print_table(["method", "file MiB", "weights MiB", "optim MiB", "keys", "trainable", "vs full"], rows)
    status = "OK" if targets["lora_vs_full"]["met"] else "MISSED"
    print(f"target lora/full: {100 * ratio:.2f}% (<= {100 * TARGET_LORA_VS_FULL:.0f}%) {status}")

    payload: dict[str, object] = {
        "benchmark": "checkpoint_size",
        "model": "all-MiniLM-L6-v2 + linear head",
        "lora_config": {
            "r": 8,
            "alpha": 16,
            "target_modules": ["query", "value"],
            "modules_to_save": ["classifier"],
        },
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "machine": machine_info(),
        "results": results,
        "targets": targets,
    }
    path = write_json("checkpoint_size", payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
