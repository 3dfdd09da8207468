"""Run by test_fsdp2.py as a script: FSDP2 (``fully_shard``), 2 CPU processes (gloo), the PEFT callback.

Lightning's ``ModelParallelStrategy`` re-launches this file once per extra rank, so it must be a script, not a
test. One invocation trains 4 steps under the strategy, resumes from the adapter-only ``last.ckpt`` to step 6
in the same processes (the process group is reused), then tries to resume it with another LoRA rank, which
must be refused. Every rank writes what it saw, gathered to full tensors, to
``<out>/{train,resume,refused}_rank<r>.pt`` for the test to compare.

Usage: ``fsdp2_train.py OUT {init,configure_model,meta} {file,distributed}``: where the model is built (the
callback injects before or after the user's ``configure_model`` shards it; ``meta``: in ``__init__`` on the
meta device, materialised by the strategy, the base weights loaded in ``on_fit_start``) and the checkpoint
layout (``save_distributed_checkpoint`` False or True).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning_peft as lp
from lightning_peft.callbacks import PEFT, AdapterCheckpointError
from lightning_peft.callbacks.adapter_checkpoint import clean_key
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer

TRAIN_STEPS, RESUME_STEPS = 4, 6


def lora(r: int = 4) -> lp.LoRAConfig:
    return lp.LoRAConfig(r=r, target_modules=["query", "value"], modules_to_save=["classifier"])


class ShardedClassifier(TinyClassifier):
    """``TinyClassifier`` whose ``configure_model`` applies FSDP2 as users do: every block, then the root."""

    def configure_model(self) -> None:
        super().configure_model()  # builds the model here when build_in_configure_model=True
        assert self.backbone is not None
        mesh = self.device_mesh["data_parallel"]
        for layer in self.backbone.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class MetaClassifier(ShardedClassifier):
    """``ShardedClassifier`` built on the meta device (under ``Trainer.init_module(empty_init=True)``), as a
    large model is. The strategy materialises it after ``configure_model`` shards it: every module is reset,
    the adapters to their own init and the base to random values; ``on_fit_start`` loads the base weights as
    users load pretrained ones, and ``on_train_start`` records the outputs with and without the adapters."""

    def on_fit_start(self) -> None:
        reference = TinyClassifier(seed=self.seed).backbone
        assert reference is not None
        load_base_weights(self, reference, prefix="backbone.")

    def on_train_start(self) -> None:
        ids = tiny_loader().dataset.tensors[0][:8]  # type: ignore[attr-defined]
        self.eval()  # no dropout: the two forwards must see the same network
        with torch.no_grad():
            self.outputs = {"tuned": full(self(ids))}
            with lp.disable_adapters(self):
                self.outputs["base"] = full(self(ids))
        self.train()


@torch.no_grad()
def load_base_weights(module: torch.nn.Module, reference: torch.nn.Module, prefix: str = "") -> None:
    """Copy ``reference``'s parameters and buffers (non-persistent ones too, such as BERT's ``position_ids``,
    which materialisation leaves as uninitialised memory) into the sharded, injected ``module``: names there
    carry ``.base_layer`` where a tuner wraps a layer; a ``DTensor`` takes its shard of the full tensor."""
    source = dict(reference.named_parameters()) | dict(reference.named_buffers())
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        key = clean_key(name).replace(".base_layer", "")
        value = source.get(key.removeprefix(prefix)) if key.startswith(prefix) else None
        if value is None:  # an adapter, or a module outside the loaded part (the classifier head)
            continue
        if isinstance(tensor, DTensor):  # a collective: every rank walks the same names in the same order
            value = distribute_tensor(value.to(tensor.dtype), tensor.device_mesh, tensor.placements)
        tensor.copy_(value)


def full(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of ``t``; gathering a DTensor is a collective every rank runs in the same order."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", copy=True)


class Record(L.Callback):
    """Full tensors of the adapters, the frozen base and the optimizer state at train start and end."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        optimizer = trainer.optimizers[0]
        optim_state: dict[str, dict[str, torch.Tensor]] = {}
        for n, p in pl_module.named_parameters():
            if p in optimizer.state:
                optim_state[clean_key(n)] = {k: full(v) for k, v in sorted(optimizer.state[p].items())}
        return {
            "global_step": trainer.global_step,
            "adapters": {clean_key(n): full(p) for n, p in lp.trainable_state_dict(pl_module).items()},
            "frozen": {clean_key(n): full(p) for n, p in pl_module.named_parameters() if not p.requires_grad},
            "optimizer": optim_state,
            "dtensor_params": sorted(
                clean_key(n) for n, p in pl_module.named_parameters() if isinstance(p, DTensor)
            ),
            "fsdp_units": sorted(
                clean_key(n) for n, m in pl_module.named_modules() if isinstance(m, FSDPModule)
            ),
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen["start"] = self._record(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen["end"] = self._record(trainer, pl_module)
        self.seen["outputs"] = getattr(pl_module, "outputs", None)  # MetaClassifier's, at train start
        self.seen["requires_grad"] = sorted(
            clean_key(n) for n, p in pl_module.named_parameters() if p.requires_grad
        )


def fit(
    out: Path, build: str, layout: str, steps: int, ckpt_path: str | None, r: int = 4
) -> tuple[L.Trainer, Record, PEFT]:
    L.seed_everything(0)
    record, peft = Record(), PEFT(lora(r), check_gradients=True)
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=layout == "distributed"
    )
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=0)
    run = trainer(
        out,
        [peft, record, ckpt],
        strategy=strategy,
        devices=2,
        max_steps=steps,
        max_epochs=10,
        deterministic=False,
    )
    module: ShardedClassifier
    if build == "meta":
        with run.init_module(empty_init=True):  # this strategy: the meta device
            module = MetaClassifier()
        assert all(p.is_meta for p in module.parameters())
    else:
        module = ShardedClassifier(build_in_configure_model=build == "configure_model")
    run.fit(module, tiny_loader(), ckpt_path=ckpt_path)
    return run, record, peft


def main(out: Path, build: str, layout: str) -> None:
    run, record, peft = fit(out, build, layout, TRAIN_STEPS, None)
    rank = run.global_rank
    torch.save({**record.seen, "grads_checked": peft._grads_checked}, out / f"train_rank{rank}.pt")
    run.strategy.barrier()
    last = str(out / "ckpt" / "last.ckpt")
    run, record, _ = fit(out / "resume", build, layout, RESUME_STEPS, last)
    torch.save(record.seen, out / f"resume_rank{rank}.pt")
    run.strategy.barrier()
    try:  # every rank checks the checkpoint before loading anything, so all of them refuse it
        fit(out / "refused", build, layout, RESUME_STEPS, last, r=8)
        refused = "not refused"
    except AdapterCheckpointError as error:
        refused = str(error)
    torch.save({"error": refused}, out / f"refused_rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
