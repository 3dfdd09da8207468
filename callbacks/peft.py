"""The ``PEFT`` callback: parameter-efficient fine-tuning of any LightningModule with one line.

Hook facts this relies on (Lightning 2.x ``trainer.fit``): callback ``setup`` -> module ``setup`` ->
``configure_model`` -> restore from ``ckpt_path`` -> strategy setup (DDP/FSDP wrapping, then
``configure_optimizers``) -> ``on_fit_start``. Injecting at ``on_fit_start`` would be too late (the
optimizer and the DDP reducer already hold the old parameters), so the tuner is injected and the base
frozen in ``setup``, or right after ``configure_model`` when the module builds its model there.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_peft.api import get_config, inject, param_summary
from lightning_peft.callbacks.adapter_checkpoint import install_load_hooks, make_meta, trim_state_dict
from lightning_peft.config import TunerConfig, config_from_dict
from lightning_peft.fingerprint import base_fingerprint
from lightning_peft.layers import iter_trainable_parameters

__all__ = ["PEFT"]


class PEFT(Callback):
    """Inject a tuner, freeze the base, and keep checkpoints adapter-only.

    Args:
        config: the tuner (``LoRAConfig``, ``BottleneckConfig``, ``BitFitConfig``, ...). A dict with a
            ``"method"`` key is accepted too (YAML recipes).
        module: dotted attribute path of the submodule to inject into (``"backbone"``); default: the
            whole LightningModule, so ``modules_to_save=["classifier"]`` can reach its head.
        adapter_only_checkpoints: trim every checkpoint's ``state_dict`` to the tuner's tensors.
        check_gradients: after the first backward, raise if a trainable parameter got no gradient
            (frozen-embedding gradient checkpointing, unused adapters) and name them.
        restore_rng: save and restore the RNG states with the callback state, so a resumed run
            continues with the same dropout masks and shuffling as an uninterrupted one.

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
        config: TunerConfig | dict[str, Any],
        *,
        module: str | None = None,
        adapter_only_checkpoints: bool = True,
        check_gradients: bool = False,
        restore_rng: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(config, dict):
            config = config_from_dict(config)
        if not isinstance(config, TunerConfig):
            raise TypeError(
                f"PEFT(config=...) takes a TunerConfig such as LoRAConfig(...), got {type(config)}"
            )
        self.config = config
        self.module = module
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.check_gradients = check_gradients
        self.restore_rng = restore_rng
        self._fingerprint: dict[str, Any] | None = None
        self._grads_checked = False

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
        install_load_hooks(pl_module, self._base_fingerprint)

    def _base_fingerprint(self) -> dict[str, Any]:
        assert self._fingerprint is not None
        return self._fingerprint

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if is_overridden("configure_model", pl_module, L.LightningModule):
            # The model may only exist after configure_model: inject right after it, before the restore
            # from ckpt_path, strategy wrapping and configure_optimizers.
            if not getattr(pl_module, "_lp_configure_model_patched", False):
                user_configure_model = pl_module.configure_model

                def configure_model_then_inject() -> None:
                    user_configure_model()
                    self._inject(pl_module)

                pl_module.configure_model = configure_model_then_inject  # type: ignore[method-assign]
                object.__setattr__(pl_module, "_lp_configure_model_patched", True)
        else:
            self._inject(pl_module)
        if self.adapter_only_checkpoints:
            self._trim_checkpoints(trainer, pl_module)

    def _trim_checkpoints(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        if "lightning_module_state_dict" in vars(strategy):
            return  # already patched by this callback in an earlier stage
        full_state_dict = strategy.lightning_module_state_dict

        def adapter_state_dict() -> dict[str, Any]:
            meta = make_meta(pl_module, self._base_fingerprint())
            return trim_state_dict(full_state_dict(), pl_module, meta)

        strategy.lightning_module_state_dict = adapter_state_dict  # type: ignore[method-assign]

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        vars(trainer.strategy).pop("lightning_module_state_dict", None)

    # -- checks and logging --------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_optimizers(trainer, pl_module)
        summary = param_summary(pl_module)
        rank_zero_info(f"[lightning-peft] {self.config.method}: {summary}")
        params = {f"peft/{k}": v for k, v in summary.as_dict().items()}
        params["peft/config"] = self.config.to_dict()
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

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

    # -- state: config check and RNG for exact resume -------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"config": self.config.to_dict()}
        if self.restore_rng:
            state["rng"] = {
                "torch": torch.get_rng_state(),
                "numpy": _numpy_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rng = state_dict.get("rng")
        if self.restore_rng and rng is not None:
            torch.set_rng_state(rng["torch"])
            _set_numpy_state(rng["numpy"])
            random.setstate(rng["python"])
            if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])


# NumPy's RNG state holds an ndarray; checkpoints loaded with torch.load(weights_only=True) take tensors only.
def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["cached"]))
