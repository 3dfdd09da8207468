"""Run by test_ddp.py as a script: 2-process CPU DDP (gloo) training with the PEFT callback.

Lightning's ``ddp`` strategy re-launches this file once per extra rank, so it must be a script, not a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer


def main(out: Path) -> None:
    L.seed_everything(0)
    module = TinyClassifier()
    config = lp.LoRAConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=0)
    fit = trainer(out, [PEFT(config, check_gradients=True), ckpt], strategy="ddp", devices=2, max_steps=4)
    fit.fit(module, tiny_loader())
    rank = fit.global_rank
    torch.save(
        {
            "adapters": dict(lp.trainable_state_dict(module)),
            "requires_grad": sorted(n for n, p in module.named_parameters() if p.requires_grad),
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
