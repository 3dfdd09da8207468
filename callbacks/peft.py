"""The ``PEFT`` callback: parameter-efficient fine-tuning of any LightningModule with one line.

Hook facts that decide correctness (Lightning 2.x ``trainer.fit``): callback ``setup`` -> module ``setup``
-> ``configure_model`` -> restore from ``ckpt_path`` -> strategy setup (DDP/FSDP wrapping, then
``configure_optimizers``) -> ``on_fit_start``. Injecting at ``on_fit_start`` would be too late (the optimizer
and the DDP reducer already hold the old parameters), so the tuner is injected and the base frozen in
``setup``, or right after ``configure_model`` when the module builds its model there (FSDP2: before it too,
so the user's ``fully_shard`` shards the adapters with their blocks). Callback ``on_save_checkpoint`` is
skipped with ``save_weights_only=True`` and comes after the state dict is built (gathered, under FSDP), so
checkpoints are trimmed at ``strategy.lightning_module_state_dict``. Loading runs the module's load hooks
before any callback's ``on_load_checkpoint``: config, base-model and adapter-key checks live in them.
Every wrap is undone in ``teardown`` (:mod:`lightning_peft.callbacks.patching`). The user guide (strategies,
meta-device models, tracking) is the README's.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_peft.api import as_config, get_config, inject, param_summary
from lightning_peft.callbacks.adapter_checkpoint import (
    META_KEY,
    full_trainable_state_dict,
    gathered_trainable_state_dict,
    install_load_hooks,
    make_meta,
    trim_state_dict,
    validate_adapter_checkpoint,
)
from lightning_peft.callbacks.attention_swap import (
    AttentionSwap,
    check_checkpoint_attention,
    explain_load_error,
)
from lightning_peft.callbacks.gradient_checkpointing import guard_gradient_checkpointing
from lightning_peft.callbacks.patching import Patches
from lightning_peft.callbacks.rng import get_rng_state, set_rng_state
from lightning_peft.callbacks.strategies import (
    DEEPSPEED_ADAPTER_KEY,
    adapter_wrap_policy,
    check_no_tensor_parallel,
    is_deepspeed,
    is_fully_sharded,
    is_model_parallel,
    load_model_parallel_checkpoint,
    metadata_into_state_dict,
    prepare_checkpoint_for_save,
    prepare_strategy,
    saves_distributed_checkpoints,
    shard_new_adapters,
)
from lightning_peft.callbacks.tracking import log_artifact, size_on_disk, wants_artifact
from lightning_peft.config import TunerConfig, config_from_dict
from lightning_peft.fingerprint import base_fingerprint
from lightning_peft.layers import iter_trainable_parameters

__all__ = ["DEEPSPEED_ADAPTER_KEY", "PEFT", "adapter_wrap_policy", "guard_gradient_checkpointing"]


class PEFT(Callback):
    """Inject a tuner, freeze the base, and keep checkpoints adapter-only.

    Args:
        config: the tuner (``LoRAConfig``, ``BottleneckConfig``, ``BitFitConfig``, ...), or a list of them
            to stack several tuners on one model. A dict with a ``"method"`` key is accepted too (YAML
            recipes).
        module: dotted attribute path of the submodule to inject into (``"backbone"``); default: the
            whole LightningModule, so ``modules_to_save=["classifier"]`` can reach its head.
        adapter_only_checkpoints: trim every checkpoint's ``state_dict`` to the tuner's tensors.
        check_gradients: after the first backward, raise if a trainable parameter got no gradient
            (frozen-embedding gradient checkpointing, unused adapters) and name them.
        restore_rng: save and restore the RNG states with the callback state, so a resumed run
            continues with the same dropout masks and shuffling as an uninterrupted one.
        log_checkpoint_artifact: log every adapter-only checkpoint as a W&B artifact when a
            ``WandbLogger`` is attached (and its own ``log_model`` is off).

    A model built on the meta device (``trainer.init_module(empty_init=True)``) gets its adapters at their
    own init when the strategy materialises it, but its frozen base at random values: load the pretrained
    weights after that, e.g. in ``on_fit_start`` (what to mind: this module's docstring).

    Example::

        from lightning_peft import LoRAConfig
        from lightning_peft.callbacks import PEFT

        peft = PEFT(LoRAConfig(r=8, alpha=16, target_modules=["query", "value"],
                               modules_to_save=["classifier"]))
        trainer = L.Trainer(callbacks=[peft])
        trainer.fit(module, datamodule)       # base frozen, adapters trained, adapter-only checkpoints
        trainer.fit(module, datamodule, ckpt_path="last")   # resumes exactly
    """

    def __init__(
        self,
        config: TunerConfig | dict[str, Any] | list[TunerConfig | dict[str, Any]],
        *,
        module: str | None = None,
        adapter_only_checkpoints: bool = True,
        check_gradients: bool = False,
        restore_rng: bool = True,
        log_checkpoint_artifact: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = config_from_dict(config)
        elif isinstance(config, (list, tuple)):  # several tuners on one model
            config = as_config([config_from_dict(c) if isinstance(c, dict) else c for c in config])
        if not isinstance(config, TunerConfig):
            raise TypeError(
                "PEFT(config=...) takes a TunerConfig such as LoRAConfig(...) or a list of them, got "
                f"{type(config).__name__}"
            )
        self.config = config
        self.module = module
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.check_gradients = check_gradients
        self.restore_rng = restore_rng
        self.log_checkpoint_artifact = log_checkpoint_artifact
        self._fingerprint: dict[str, Any] | None = None
        self._grads_checked = False
        self._patches = Patches()

    # -- injection -----------------------------------------------------------------------------------
    def _target(self, pl_module: L.LightningModule) -> torch.nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            children = [n for n, _ in pl_module.named_children()]
            raise AttributeError(
                f"PEFT(module={self.module!r}): {type(pl_module).__name__} has no such submodule "
                f"(its children: {', '.join(children) or 'none'}). Build it in __init__ or configure_model."
            ) from None

    def _inject(self, pl_module: L.LightningModule) -> None:
        target = self._target(pl_module)
        existing = get_config(target)
        if existing is None:
            inject(target, self.config)
            self._fingerprint = base_fingerprint(pl_module)
        elif existing.diff(self.config):
            raise ValueError(
                "the module already carries a different tuner than this PEFT callback's config:\n  "
                + "\n  ".join(existing.diff(self.config))
            )
        elif self._fingerprint is None:
            self._fingerprint = base_fingerprint(pl_module)
        if is_fully_sharded(target):
            # FSDP2: adapters injected after configure_model sharded the model (or left out by the user's
            # fully_shard calls) belong to no unit; unsharded, every rank would train its own replica.
            check_no_tensor_parallel(target)
            shard_new_adapters(target)
        install_load_hooks(pl_module, self._base_fingerprint)
        guard_gradient_checkpointing(target)

    def _is_built(self, pl_module: L.LightningModule) -> bool:
        try:
            return any(True for _ in self._target(pl_module).parameters())
        except AttributeError:
            return False

    def _base_fingerprint(self) -> dict[str, Any]:
        if self._fingerprint is None:
            raise RuntimeError(
                "the PEFT callback has not injected its tuner in this fit yet (its setup did not run, or "
                "configure_model was called outside trainer.fit); give the Trainer this callback instance"
            )
        return self._fingerprint

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if is_overridden("configure_model", pl_module, L.LightningModule):
            # The model may only exist after configure_model: inject right after it, before the restore
            # from ckpt_path, strategy wrapping and configure_optimizers.
            def inject_around(user_configure_model: Any) -> Any:
                def configure_model_then_inject() -> None:
                    if is_model_parallel(pl_module.trainer.strategy) and self._is_built(pl_module):
                        # FSDP2: configure_model shards. A model built in __init__ gets its adapters first,
                        # so the user's fully_shard calls shard them with their blocks.
                        self._inject(pl_module)
                    user_configure_model()
                    self._inject(pl_module)

                return configure_model_then_inject

            self._patches.wrap(pl_module, "configure_model", inject_around)
        else:
            self._inject(pl_module)
        prepare_strategy(trainer.strategy, self.adapter_only_checkpoints)
        if self.adapter_only_checkpoints:
            self._trim_checkpoints(trainer, pl_module)
        self._after_checkpoint_writes(trainer, pl_module)
        if is_model_parallel(trainer.strategy):
            self._load_adapter_checkpoints(trainer)
        elif not is_deepspeed(trainer.strategy):
            self._patches.wrap(
                trainer.strategy,
                "load_checkpoint",
                lambda load: lambda *a, **kw: metadata_into_state_dict(load(*a, **kw)),
            )

    def _load_adapter_checkpoints(self, trainer: L.Trainer) -> None:
        """ModelParallelStrategy restores into every key of the model: adapter-only checkpoints take
        :func:`load_model_parallel_checkpoint` (other checkpoints still reach the strategy's own loader)."""
        strategy = trainer.strategy

        def wrap(load: Any) -> Any:
            def load_adapters(path: Any, weights_only: bool | None = None) -> dict[str, Any]:
                return load_model_parallel_checkpoint(
                    strategy, load, path, self._base_fingerprint, weights_only
                )

            return load_adapters

        self._patches.wrap(strategy, "load_checkpoint", wrap)

    def _trim_checkpoints(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy

        def wrap(full_state_dict: Any) -> Any:
            def adapter_state_dict() -> dict[str, Any]:
                meta = make_meta(pl_module, self._base_fingerprint())
                if is_deepspeed(strategy) and getattr(strategy, "zero_stage_3", False):
                    # The full state dict would hold empty ZeRO-3 placeholders: gather the adapters only.
                    return trim_state_dict(gathered_trainable_state_dict(pl_module), pl_module, meta)
                if is_model_parallel(strategy) and not saves_distributed_checkpoints(strategy):
                    # Its full state dict gathers the whole model onto rank 0: gather the adapters only.
                    return trim_state_dict(full_trainable_state_dict(pl_module), pl_module, meta)
                return trim_state_dict(full_state_dict(), pl_module, meta)

            return adapter_state_dict

        self._patches.wrap(strategy, "lightning_module_state_dict", wrap)

    def _after_checkpoint_writes(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Wrap ``strategy.save_checkpoint``: it gets the file path, and returns once the file is written
        (ModelCheckpoint, ``trainer.save_checkpoint``; Lightning offers callbacks no post-write hook)."""
        strategy = trainer.strategy

        def wrap(save: Any) -> Any:
            def save_then_track(checkpoint: dict[str, Any], filepath: Any, *args: Any, **kwargs: Any) -> None:
                prepare_checkpoint_for_save(strategy, checkpoint)
                save(checkpoint, filepath, *args, **kwargs)
                if trainer.is_global_zero:
                    self._track_checkpoint(trainer, Path(filepath), checkpoint.get("global_step", 0))

            return save_then_track

        self._patches.wrap(strategy, "save_checkpoint", wrap)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._patches.restore()  # the module can be fitted again, with new Trainers and callbacks

    # -- checks and logging --------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_optimizers(trainer, pl_module)
        summary = param_summary(pl_module)
        rank_zero_info(f"[lightning-peft] {self.config.method}: {summary}")
        params: dict[str, Any] = {f"peft/{k}": v for k, v in summary.as_dict().items()}
        params["peft/config"] = self.config.to_dict()
        swaps = [cb.record for cb in trainer.callbacks if isinstance(cb, AttentionSwap)]
        params["peft/attention"] = swaps[0] if len(swaps) == 1 else (swaps or None)
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    def _track_checkpoint(self, trainer: L.Trainer, path: Path, step: int) -> None:
        size = size_on_disk(path)
        for logger in trainer.loggers:
            logger.log_hyperparams({"peft/checkpoint_bytes": size, "peft/checkpoint": str(path)})
            if self.log_checkpoint_artifact and wants_artifact(logger):
                log_artifact(logger, path, size, step, self.config)

    def _check_optimizers(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        in_opt = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        if not in_opt:
            return
        named = dict(pl_module.named_parameters())
        if not in_opt & {id(p) for p in named.values()}:
            return  # the strategy optimises copies (e.g. DeepSpeed's flat fp32 groups): nothing to compare
        missing = [n for n, p in iter_trainable_parameters(pl_module) if id(p) not in in_opt]
        if missing:
            raise RuntimeError(
                f"the optimizer does not hold {len(missing)} trainable adapter parameter(s), e.g. "
                f"{', '.join(missing[:5])}. configure_optimizers must build the optimizer from "
                "`filter(lambda p: p.requires_grad, self.parameters())` (or all parameters) when it runs: "
                "PEFT injects the adapters before it."
            )
        frozen = [n for n, p in named.items() if id(p) in in_opt and not p.requires_grad]
        if frozen:
            warnings.warn(
                f"the optimizer holds {len(frozen)} frozen parameter(s) (e.g. {', '.join(frozen[:3])}); they "
                "will not train. Add modules that should train to modules_to_save, or build the optimizer "
                "from parameters with requires_grad=True to save optimizer memory.",
                stacklevel=2,
            )

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.check_gradients or self._grads_checked:
            return
        self._grads_checked = True
        no_grad = [n for n, p in iter_trainable_parameters(pl_module) if p.grad is None]
        if no_grad:
            raise RuntimeError(
                f"{len(no_grad)} trainable parameter(s) received no gradient in the first backward, e.g. "
                f"{', '.join(no_grad[:5])}. Common causes: gradient checkpointing with a frozen embedding "
                "(call model.enable_input_require_grads() or use non-reentrant checkpointing), adapters on "
                "layers the forward never runs, or a loss that does not depend on them."
            )

    @override
    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # DeepSpeed restores module weights inside its engine, past the load hooks: apply the same config,
        # base-model and missing-adapter checks to the adapter state dict stored in its client state.
        adapters = checkpoint.get(DEEPSPEED_ADAPTER_KEY)
        if adapters and META_KEY in adapters:
            keys = {k for k in adapters if k != META_KEY}
            validate_adapter_checkpoint(pl_module, keys, adapters[META_KEY], self._base_fingerprint())
        check_checkpoint_attention(trainer, pl_module, checkpoint)  # trained with a swapped attention?

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        explain_load_error(trainer, exception)  # a swapped variant's keys, unexpected in this model

    # -- state: config check and RNG for exact resume -------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"config": self.config.to_dict()}
        if self.restore_rng:
            state["rng"] = get_rng_state()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rng = state_dict.get("rng")
        if self.restore_rng and rng is not None:
            set_rng_state(rng)
