"""FSDP and DeepSpeed with the PEFT callback.

The strategy runs need CUDA (and DeepSpeed the ``deepspeed`` package): they are marked ``gpu`` and skip
with a reason elsewhere. The pieces that do not need a device (wrap policy, strategy settings, key
cleaning, prefixed loading as under an FSDP root) are checked on CPU.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import lightning_peft as lp
from lightning_peft.callbacks import PEFT, AdapterCheckpointError
from lightning_peft.callbacks.adapter_checkpoint import (
    META_KEY,
    clean_key,
    install_load_hooks,
    trainable_keys,
)
from lightning_peft.callbacks.strategies import DEEPSPEED_ADAPTER_KEY, adapter_wrap_policy, prepare_strategy
from lightning_peft.fingerprint import base_fingerprint
from lightning_peft.layers import TRAINABLE_ATTR
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FSDP / DeepSpeed runs need a CUDA device"
)


def lora() -> lp.LoRAConfig:
    return lp.LoRAConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])


# -- CPU: the code paths the strategies go through --------------------------------------------------------
def test_wrap_policy_makes_every_fully_trainable_module_its_own_unit() -> None:
    module = TinyClassifier()
    lp.inject(module, lora())
    policy = adapter_wrap_policy(None)
    units = policy._run_policy(module, set(), {})
    names = {n for n, m in module.named_modules() if m in units}
    expected = {n for n, m in module.named_modules() if getattr(m, TRAINABLE_ATTR, None) is True}
    assert names == expected and any(n.endswith("lora_A") for n in names) and "classifier" in names


def test_wrap_policy_keeps_the_users_units() -> None:
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.bert.modeling_bert import BertLayer

    module = TinyClassifier()
    lp.inject(module, lora())
    units = adapter_wrap_policy(ModuleWrapPolicy({BertLayer}))._run_policy(module, set(), {})
    assert sum(isinstance(m, BertLayer) for m in units) == 2
    assert module.classifier in units


def test_fsdp_strategy_is_prepared_and_flat_parameters_are_refused() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = FSDPStrategy()
    prepare_strategy(strategy, adapter_only=True)
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy.kwargs["auto_wrap_policy"]._lp_adapter_units
    policy = strategy.kwargs["auto_wrap_policy"]
    prepare_strategy(strategy, adapter_only=True)  # a second stage keeps the same policy
    assert strategy.kwargs["auto_wrap_policy"] is policy
    with pytest.raises(ValueError, match="use_orig_params=True"):
        prepare_strategy(FSDPStrategy(use_orig_params=False), adapter_only=True)


def test_fsdp_sharded_state_dicts_are_refused_for_adapter_only_checkpoints() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match='state_dict_type="full"'):
        prepare_strategy(FSDPStrategy(state_dict_type="sharded"), adapter_only=True)
    with pytest.raises(ValueError, match="adapter_only_checkpoints=False"):
        prepare_strategy(FSDPStrategy(state_dict_type="sharded"), adapter_only=True)
    full = FSDPStrategy(state_dict_type="full")
    prepare_strategy(full, adapter_only=True)
    assert full.kwargs["auto_wrap_policy"]._lp_adapter_units
    # Whole-model checkpoints keep every key, which Lightning's sharded loading needs.
    prepare_strategy(FSDPStrategy(state_dict_type="sharded"), adapter_only=False)


def test_fsdp_sharded_state_dict_is_refused_by_the_callback_setup() -> None:
    """The callback's ``setup`` applies the check (FSDPStrategy runs need CUDA; its setup hook does not)."""
    from lightning.pytorch.strategies import FSDPStrategy

    fake_trainer = SimpleNamespace(strategy=FSDPStrategy(state_dict_type="sharded"))
    with pytest.raises(ValueError, match='state_dict_type="full"'):
        PEFT(lora()).setup(fake_trainer, TinyClassifier(), "fit")  # type: ignore[arg-type]
    PEFT(lora(), adapter_only_checkpoints=False).setup(fake_trainer, TinyClassifier(), "fit")  # type: ignore[arg-type]


def test_wrapper_fragments_are_ignored_in_keys() -> None:
    assert (
        clean_key("backbone._fsdp_wrapped_module.q.lora_A._fsdp_wrapped_module.weight")
        == "backbone.q.lora_A.weight"
    )
    assert clean_key("layer._checkpoint_wrapped_module.dense.weight") == "layer.dense.weight"


class _Root(nn.Module):
    """Stands in for an FSDP root: the LightningModule sits one prefix down, like ``_fsdp_wrapped_module``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner


def test_adapter_checkpoint_loads_under_a_prefix_and_still_refuses_missing_adapters() -> None:
    trained = TinyClassifier()
    lp.inject(trained, lora())
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(1.0)
    fingerprint = base_fingerprint(trained)
    state = {k: v for k, v in trained.state_dict().items() if k in trainable_keys(trained)}
    state[META_KEY] = {"version": 1, "config": lora().to_dict(), "fingerprint": fingerprint}

    fresh = TinyClassifier()
    lp.inject(fresh, lora())
    install_load_hooks(fresh, lambda: fingerprint)
    root = _Root(fresh)
    root.load_state_dict({f"inner.{k}": v for k, v in state.items()}, strict=True)  # frozen keys forgiven
    for k, v in lp.trainable_state_dict(trained).items():
        assert torch.equal(lp.trainable_state_dict(fresh)[k], v), k

    broken = {f"inner.{k}": v for k, v in state.items() if "value.lora_B" not in k}
    with pytest.raises(AdapterCheckpointError, match="lacks 2 adapter tensor"):
        _Root(fresh).load_state_dict(broken, strict=True)


# -- CUDA: real strategy runs --------------------------------------------------------------------------
class _Snapshot(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = {
            clean_key(n): p.detach().clone() for n, p in lp.trainable_state_dict(pl_module).items()
        }


def _fit(tmp_path: Path, strategy, module: TinyClassifier, ckpt_path: str | None = None, steps: int = 3):
    snap = _Snapshot()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    t = trainer(
        tmp_path,
        [PEFT(lora(), check_gradients=True), snap, ckpt],
        accelerator="cuda",
        devices=1,
        strategy=strategy,
        max_steps=steps,
        max_epochs=10,
        deterministic=False,
    )
    t.fit(module, tiny_loader(), ckpt_path=ckpt_path)
    return t, snap


@pytest.mark.gpu
@needs_cuda
def test_fsdp_trains_adapters_in_their_own_units_and_saves_nonempty_adapters(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    module = TinyClassifier()
    t, snap = _fit(tmp_path, FSDPStrategy(state_dict_type="full"), module)
    units = [m for m in t.strategy.model.modules() if isinstance(m, FullyShardedDataParallel)]
    adapter_units = [u for u in units if getattr(u.module, TRAINABLE_ATTR, None) is True]
    assert len(adapter_units) == 9  # 8 lora_A/lora_B + the classifier
    for unit in units:  # no FlatParameter mixes frozen and trainable tensors
        own = {p.requires_grad for n, p in unit.module.named_parameters() if "_fsdp_wrapped_module" not in n}
        assert len(own) <= 1, unit

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    tensors = {k: v for k, v in saved.items() if k != META_KEY}
    assert set(tensors) == set(snap.before)
    assert all(v.numel() > 0 for v in tensors.values())
    assert any(not torch.equal(tensors[k].cpu(), snap.before[k].cpu()) for k in tensors if "lora_B" in k)

    resumed = TinyClassifier()
    t2, _ = _fit(
        tmp_path / "resume",
        FSDPStrategy(state_dict_type="full"),
        resumed,
        str(tmp_path / "ckpt" / "last.ckpt"),
        steps=5,
    )
    assert t2.global_step == 5


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_saves_gathered_nonempty_adapters_and_resumes(tmp_path: Path, stage: int) -> None:
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    module = TinyClassifier()
    _, snap = _fit(tmp_path, DeepSpeedStrategy(stage=stage), module)
    folder = tmp_path / "ckpt" / "last.ckpt"
    assert folder.is_dir()
    (states,) = folder.glob("checkpoint/*model_states.pt")
    client = torch.load(states, weights_only=False)
    adapters = {k: v for k, v in client[DEEPSPEED_ADAPTER_KEY].items() if k != META_KEY}
    assert set(adapters) == set(snap.before)
    assert all(v.numel() > 0 and v.shape == snap.before[k].shape for k, v in adapters.items())
    assert any(not torch.equal(adapters[k].cpu(), snap.before[k].cpu()) for k in adapters if "lora_B" in k)
    frozen_in_module_file = [k for k in client.get("module") or {} if k not in adapters]
    assert not frozen_in_module_file  # exclude_frozen_parameters: the engine saved adapters only

    resumed = TinyClassifier()
    t2, _ = _fit(tmp_path / "resume", DeepSpeedStrategy(stage=stage), resumed, str(folder), steps=5)
    assert t2.global_step == 5


def test_deepspeed_client_state_is_checked_on_resume(tmp_path: Path) -> None:
    """DeepSpeed loads weights in its engine; the callback checks the adapter state dict it stored."""
    module, callback = TinyClassifier(), PEFT(lora())
    trainer(tmp_path, [callback], max_steps=1).fit(module, tiny_loader())
    meta = {"version": 1, "config": lora().to_dict(), "fingerprint": base_fingerprint(module)}
    adapters = {clean_key(k): v for k, v in lp.trainable_state_dict(module).items()}
    callback.on_load_checkpoint(module.trainer, module, {DEEPSPEED_ADAPTER_KEY: {**adapters, META_KEY: meta}})
    other = {**meta, "config": {**lora().to_dict(), "r": 8}}
    with pytest.raises(AdapterCheckpointError, match="r: 8 vs 4"):
        callback.on_load_checkpoint(
            module.trainer, module, {DEEPSPEED_ADAPTER_KEY: {**adapters, META_KEY: other}}
        )
    fewer = {k: v for k, v in adapters.items() if "query.lora_A" not in k}
    with pytest.raises(AdapterCheckpointError, match="lacks 2 adapter tensor"):
        callback.on_load_checkpoint(
            module.trainer, module, {DEEPSPEED_ADAPTER_KEY: {**fewer, META_KEY: meta}}
        )
