"""Loading language models with their LM heads (offline): masked LMs and causal LMs.

Prompt-based classification needs the pretrained LM head, so the model is an ``AutoModelForMaskedLM``
(BERT / RoBERTa families) or ``AutoModelForCausalLM`` (GPT-2 / Llama families), never a bare encoder. A
checkpoint without trained LM-head weights (all-MiniLM-L6-v2 is a sentence-embedding model: no MLM head) is
refused instead of silently scoring label words with a random head.
"""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

__all__ = ["CAUSAL_TYPES", "is_causal_config", "lm_from_config", "load_lm", "load_lm_tokenizer"]

CAUSAL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "opt", "phi", "gemma", "smollm3")


def is_causal_config(config: transformers.PretrainedConfig) -> bool:
    """Whether a config describes a decoder-only LM (by its architectures or model type)."""
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs):
        return False
    return config.model_type in CAUSAL_TYPES


def load_lm(name_or_path: str, **kwargs: Any) -> nn.Module:
    """Load a masked or causal LM with its head from a local folder (or a name ``resolve_pretrained_path``
    knows), in train mode.

    Raises:
        ValueError: The folder's weights lack the LM head (e.g. a sentence-embedding model).
    """
    from lightning_peft.tasks.pretrained import (
        _quiet_transformers,
        resolve_pretrained_path,
    )  # no import cycle

    path = resolve_pretrained_path(name_or_path)
    config = transformers.AutoConfig.from_pretrained(path)
    auto = AutoModelForCausalLM if is_causal_config(config) else AutoModelForMaskedLM
    with _quiet_transformers():
        model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    head = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
    tied = getattr(model.config, "tie_word_embeddings", False)
    head = [k for k in head if not (tied and ("decoder.weight" in k or k.endswith("lm_head.weight")))]
    if head:
        raise ValueError(
            f"{name_or_path!r} has no trained language-model head ({len(head)} missing weights, e.g. "
            f"{head[:3]}): prompt-based classification scores label words with the pretrained head. "
            "Use a masked LM (BERT / RoBERTa families) or a causal LM checkpoint."
        )
    return model.train()


def lm_from_config(config: dict[str, Any]) -> nn.Module:
    """A randomly initialised LM-head model from ``{"model_type": ..., <fields>}`` (tests, smoke runs)."""
    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ValueError(f"config needs a 'model_type' (e.g. 'bert', 'gpt2'); got keys {sorted(config)}")
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    auto = AutoModelForCausalLM if model_type in CAUSAL_TYPES else AutoModelForMaskedLM
    return auto.from_config(hf_config)


def load_lm_tokenizer(name_or_path: str | None) -> Any:
    """The tokenizer of a model folder / known name; a pad token is set for decoders that lack one."""
    from lightning_peft.tasks.pretrained import load_tokenizer  # no import cycle

    tokenizer = load_tokenizer(name_or_path)
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
