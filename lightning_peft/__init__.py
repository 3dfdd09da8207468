"""lightning-peft: parameter-efficient fine-tuning for any ``nn.Module``, one Lightning callback away.

Plain PyTorch::

    from lightning_peft import LoRAConfig, inject, merge, param_summary

    inject(model, LoRAConfig(r=8, alpha=16, target_modules=["query", "value"]))

Lightning: ``trainer = L.Trainer(callbacks=[lightning_peft.callbacks.PEFT(LoRAConfig(...))])``.
"""

from lightning_peft import tuners as _tuners  # registers every method
from lightning_peft.api import (
    ParamSummary,
    disable_adapters,
    freeze_base,
    get_config,
    inject,
    load_trainable_state_dict,
    mark_trainable,
    merge,
    param_summary,
    trainable_state_dict,
    unload,
    unmerge,
)
from lightning_peft.checkpoint import load_checkpoint
from lightning_peft.config import TunerConfig, available_tuners, config_from_dict, register_tuner
from lightning_peft.stack import TunerStack
from lightning_peft.tuners.adapterdrop import AdapterDropConfig, set_adapter_drop
from lightning_peft.tuners.bitfit import BitFitConfig
from lightning_peft.tuners.bottleneck import BottleneckConfig
from lightning_peft.tuners.compacter import CompacterConfig, CompacterPlusPlusConfig
from lightning_peft.tuners.early_exit import EarlyExitConfig
from lightning_peft.tuners.fusion import FusionConfig, fusion_weights
from lightning_peft.tuners.kadapter import (
    KAdapterConfig,
    add_kadapter,
    kadapter_features,
    kadapter_output,
    train_kadapter,
)
from lightning_peft.tuners.lora import LoRAConfig
from lightning_peft.tuners.prefix import PrefixTuningConfig, fold_prefix
from lightning_peft.tuners.prompt import PromptTuningConfig
from lightning_peft.tuners.ptuning import PTuningConfig
from lightning_peft.tuners.unified import UnifiedConfig

__version__ = "0.1.0"

__all__ = [
    "AdapterDropConfig",
    "BitFitConfig",
    "BottleneckConfig",
    "CompacterConfig",
    "CompacterPlusPlusConfig",
    "EarlyExitConfig",
    "FusionConfig",
    "KAdapterConfig",
    "LoRAConfig",
    "PTuningConfig",
    "ParamSummary",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "TunerConfig",
    "TunerStack",
    "UnifiedConfig",
    "add_kadapter",
    "available_tuners",
    "config_from_dict",
    "disable_adapters",
    "fold_prefix",
    "freeze_base",
    "fusion_weights",
    "get_config",
    "inject",
    "kadapter_features",
    "kadapter_output",
    "load_checkpoint",
    "load_trainable_state_dict",
    "mark_trainable",
    "merge",
    "param_summary",
    "register_tuner",
    "set_adapter_drop",
    "train_kadapter",
    "trainable_state_dict",
    "unload",
    "unmerge",
]
del _tuners
