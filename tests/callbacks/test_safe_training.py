"""Safe training: gradient checkpointing with a frozen embedding, in either order; bf16 on CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.callbacks.peft import guard_gradient_checkpointing
from lightning_peft.tuners.lora import LoRALinear
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer
from tests.models import tiny_model


def lora() -> lp.LoRAConfig:
    return lp.LoRAConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])


def enable_reentrant_checkpointing(model: torch.nn.Module) -> None:
    """Reentrant checkpointing without input grads: what transformers 4.x leaves for a model not loaded
    through peft, and what anyone gets who turns input grads off (transformers #23170)."""
    kwargs = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # transformers 4.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()


class _CheckpointingInSetup(TinyClassifier):
    """Turns checkpointing on in the module's setup, i.e. after the callback injected the adapters."""

    def setup(self, stage: str) -> None:
        enable_reentrant_checkpointing(self.backbone)


class _Grads(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = {n: p.detach().clone() for n, p in lp.trainable_state_dict(pl_module).items()}
        self.norms: dict[str, float] = {}

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The last backward's gradient norms (the first one has lora_A's at 0: lora_B starts at zero).
        self.norms = {
            n: (0.0 if p.grad is None else float(p.grad.float().norm()))
            for n, p in pl_module.named_parameters()
            if p.requires_grad
        }


@pytest.mark.parametrize("order", ["checkpointing_first", "checkpointing_after_injection"])
def test_adapters_train_under_reentrant_checkpointing_with_frozen_embeddings(
    tmp_path: Path, order: str
) -> None:
    if order == "checkpointing_first":
        module = TinyClassifier()
        enable_reentrant_checkpointing(module.backbone)
    else:
        module = _CheckpointingInSetup()
    grads = _Grads()
    trainer(tmp_path, [PEFT(lora(), check_gradients=True), grads], max_steps=3).fit(module, tiny_loader())
    assert module.backbone.is_gradient_checkpointing
    lora_grads = {n: g for n, g in grads.norms.items() if "lora_" in n}
    assert len(lora_grads) == 8 and all(g > 0 for g in lora_grads.values()), lora_grads
    after = lp.trainable_state_dict(module)
    unchanged = [n for n, v in grads.before.items() if torch.equal(v, after[n])]
    assert not unchanged


def test_the_guard_is_what_makes_them_train() -> None:
    """Without the hook the same setup leaves every adapter without a gradient (the bug is real here)."""
    ids = torch.randint(2, 97, (2, 7))
    for guarded in (False, True):
        model = tiny_model("bert").train()
        enable_reentrant_checkpointing(model)
        lp.inject(model, lp.LoRAConfig(r=2, target_modules=["query"]))
        if guarded:
            guard_gradient_checkpointing(model)
        head = torch.nn.Linear(32, 1)  # a trainable head, so the loss still has a graph
        head(model(input_ids=ids).last_hidden_state).sum().backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
        assert all((g is not None) is guarded for g in grads)


def test_the_guard_does_nothing_without_checkpointing() -> None:
    model = tiny_model("bert").train().requires_grad_(False)
    guard_gradient_checkpointing(model)
    guard_gradient_checkpointing(model)  # idempotent
    embeddings = model.get_input_embeddings()
    assert len(embeddings._forward_hooks) == 1
    assert not embeddings(torch.tensor([[3, 4]])).requires_grad


def _merged_weight_dtypes(module: TinyClassifier) -> set[torch.dtype]:
    backbone = lp.unload(copy.deepcopy(module.backbone), merge_weights=True)
    return {backbone.get_submodule(n).weight.dtype for n in ("encoder.layer.0.attention.self.query",)}


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_on_cpu_trains_adapters_and_merging_keeps_the_base_dtype(tmp_path: Path, precision: str) -> None:
    module = TinyClassifier(lr=2e-2)
    if precision == "bf16-true":
        module = module.to(torch.bfloat16)  # a bf16 base, as loaded with dtype=torch.bfloat16
    base_dtype = torch.float32 if precision == "bf16-mixed" else torch.bfloat16
    grads = _Grads()
    trainer(tmp_path, [PEFT(lora(), check_gradients=True), grads], max_steps=3, precision=precision).fit(
        module, tiny_loader()
    )
    after = lp.trainable_state_dict(module)
    assert {v.dtype for v in after.values()} == {base_dtype}
    assert all(g > 0 for n, g in grads.norms.items() if "lora_" in n)
    assert all(not torch.equal(v, after[n]) for n, v in grads.before.items() if "lora_B" in n)

    layer = module.backbone.get_submodule("encoder.layer.0.attention.self.query")
    assert isinstance(layer, LoRALinear) and layer.weight.dtype == base_dtype
    assert _merged_weight_dtypes(module) == {base_dtype}
    x = torch.randn(3, 32, dtype=base_dtype)
    with torch.no_grad():
        unmerged = layer(x)
        lp.merge(module.backbone)
        merged = layer(x)
        lp.unmerge(module.backbone)
    tol = 1e-5 if base_dtype == torch.float32 else 3e-2
    torch.testing.assert_close(merged, unmerged, rtol=tol, atol=tol)
