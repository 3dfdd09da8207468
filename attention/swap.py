"""Put a registered attention variant into a Hugging Face BERT, RoBERTa, GPT-2 or Llama model.

:func:`swap_attention` takes one of two routes per model and says which in the :class:`SwapReport` it returns:

* ``"attention_interface"`` (transformers 5.x for all four families; 4.57 for GPT-2 and Llama). One
  attention function is registered with ``transformers.AttentionInterface`` under the key
  ``"lightning_peft"``, **together with** a mask function under the same key in
  ``transformers.AttentionMaskInterface`` (without one, the model's mask builders see an unknown key and
  silently pass no mask at all). The mask function hands the attention function the compact ``(B, Tk)``
  key-padding mask instead of a dense ``(B, 1, Tq, Tk)`` one; causality is applied by the variant
  (``causal=True``), which is decided per model at swap time. The model's ``config._attn_implementation`` is
  set to the key (through ``model.set_attn_implementation`` where the model allows it). The variant instance
  of each layer is attached to that layer's attention module as the submodule ``attention_variant``, so its
  parameters (Linformer projections, Synthesizer logits, ...) train and save; the registered function looks
  it up on the module it is called with.
* ``"module"`` (BERT/RoBERTa on transformers 4.57, whose self-attention does not go through the interface, and
  token mixers on every version). ``<layer>.attention.self`` is replaced by :class:`VariantSelfAttention`
  (which keeps the original ``query``/``key``/``value`` projections under the same names) or, for token
  mixers (FNet, MLP-Mixer), by :class:`TokenMixerSelfAttention`. Both return ``(output, None)`` like the
  module they replace. The ``(B, 1, 1, Tk)`` / ``(B, 1, Tq, Tk)`` masks that 4.57 BERT builds are reduced
  to a key-padding mask (a key is real if any query may attend to it).

Either way the q/k/v projections keep their names, so pretrained weights load and LoRA targets such as
``["query", "value"]`` or ``["q_proj", "v_proj"]`` still match; the state dict only *gains* the variant's
parameters (if it has any). Token mixers have no q/k/v: their swap drops the replaced projections.

Not carried over: attention-probability dropout (the variants have none) and ``output_attentions`` (the
weights are returned as ``None``). With a KV cache (generation) the cached keys reach the variant as cached
keys (``num_cached = Tk - Tq - num_prefix``, the queries being the last ``Tq`` tokens), never as prefix keys:
windowed and synthesised variants place each query at its true position, so a cached decoding step returns
what the full forward returns. Prefix tuning passes its ``num_prefix`` explicitly. Variants that cannot honour
a cache (``capabilities.kv_cache`` False, e.g. Reformer, whose keys are the queries a cache does not keep)
refuse it: generate with ``use_cache=False``. Pre-allocated (static) caches are refused too: the attention
function cannot tell which of their slots the queries occupy; use the default dynamic cache.

Checking transformers 4.57 (the module-replacement route) in a side environment, from the repository root::

    python3 -m venv .venv457
    .venv457/bin/pip install "torch==2.13.0" "transformers==4.57.6" lightning pytest -e .
    .venv457/bin/pytest tests/attention/test_swap.py tests/callbacks/test_attention_swap.py

(``.venv*/`` is git-ignored.) The same tests run on 5.x in the main environment; the route each family takes
on each version is asserted by ``test_route_matches_the_transformers_version``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_peft.attention.base import (
    AttentionVariant,
    TokenMixer,
    available_attention,
    build_attention,
    get_attention,
)
from lightning_peft.attention.interface import (
    INTERFACE_KEY,
    key_padding_from_mask,
    padding_mask_function,
    register_interface,
    repeat_kv,
    routes_through_interface,
    variant_attention,
)
from lightning_peft.attention.modules import TokenMixerSelfAttention, VariantSelfAttention
from lightning_peft.layers import mark
from lightning_peft.layouts import find_hf_model, find_stacks, get_layout

__all__ = [
    "INTERFACE_KEY",
    "SwapReport",
    "TokenMixerSelfAttention",
    "VariantSelfAttention",
    "key_padding_from_mask",
    "padding_mask_function",
    "repeat_kv",
    "routes_through_interface",
    "swap_attention",
    "swapped",
    "variant_attention",
]

_SWAP_ATTR = "_lightning_peft_swap"


@dataclass(frozen=True)
class SwapReport:
    """What :func:`swap_attention` did.

    Attributes:
        variant: the registered name swapped in.
        options: the keyword options the variant was built with.
        model_type: the Hugging Face ``config.model_type``.
        route: ``"attention_interface"`` or ``"module"`` (see the module docstring).
        causal: whether the variant is called with ``causal=True``.
        modules: qualified names of the attention modules that now run the variant.
    """

    variant: str
    options: dict[str, Any]
    model_type: str
    route: str
    causal: bool
    modules: tuple[str, ...] = field(default_factory=tuple)

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return (
            f"{self.variant}({opts}) in {len(self.modules)} {self.model_type} attention layers"
            f" via {self.route}"
            f"{' (causal)' if self.causal else ''}: {', '.join(self.modules)}"
        )


# ------------------------------------------------------------------------------------------------- swapping
def _swap_targets(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """``(path, self-attention module, causal)`` of every block of ``model``, from its layout
    (:mod:`lightning_peft.layouts`); cross-attention is never a target."""
    layout = get_layout(model, owner="swap_attention")
    if layout.encoder_decoder:
        raise ValueError(
            f"swap_attention supports encoder-only and decoder-only models; {type(model).__name__} "
            f"({layout.family}) is an encoder-decoder"
        )
    targets = []
    for stack in find_stacks(model, owner="swap_attention"):
        rel = stack.layout.block.attention
        for block_name, block in zip(stack.block_names(), stack.blocks, strict=True):
            module = block.get_submodule(rel)
            if type(module).__name__ not in stack.layout.block.attention_classes:
                raise ValueError(
                    f"swap_attention: {block_name}.{rel} is a {type(module).__name__}, not the "
                    f"self-attention class the {layout.family!r} layout names "
                    f"({', '.join(stack.layout.block.attention_classes)})"
                )
            targets.append((f"{block_name}.{rel}", module, stack.causal))
    return targets


def _head_shape(module: nn.Module, config: Any) -> tuple[int, int]:
    if hasattr(module, "attention_head_size"):  # BERT / RoBERTa (num_attention_heads), DistilBERT (n_heads)
        heads = getattr(module, "num_attention_heads", None) or module.n_heads
        return int(heads), int(module.attention_head_size)
    heads = getattr(module, "num_heads", None) or config.num_attention_heads  # GPT-2 / Llama
    return int(heads), int(module.head_dim)


def _set_parent(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def swap_attention(model: nn.Module, name: str, **options: Any) -> SwapReport:
    """Make every self-attention layer of a Hugging Face model run attention variant ``name``.

    Args:
        model: a ``transformers`` BERT, RoBERTa, GPT-2 or Llama model (any head).
        name: a registered variant (``lightning_peft.attention.available_attention()``).
        **options: keyword options of the variant (``window=...``, ``bucket_size=...``).

    Returns:
        A :class:`SwapReport` listing the swapped modules and the route taken. Swapping the same variant
        with the same options again is a no-op that returns the first report; another variant is refused.

    Raises:
        ValueError: unknown variant (the message lists the known ones), unsupported model, relative position
            embeddings, or a causal model with a variant that cannot be causal.

    Example::

        report = swap_attention(bert, "sliding_window", window=128)
        print(report)  # sliding_window(window=128) in 12 bert attention layers via attention_interface
    """
    cls = get_attention(name)  # raises for an unknown name, listing the known ones
    _, model = find_hf_model(model, owner="swap_attention")
    config = model.config
    previous: SwapReport | None = getattr(model, _SWAP_ATTR, None)
    if previous is not None:
        if previous.variant == name and previous.options == options:
            return previous
        raise ValueError(f"this model already runs {previous}; swap a fresh model instead of swapping twice")
    _check_positions(config)
    if isinstance(getattr(config, "sliding_window", None), int) and getattr(
        config, "use_sliding_window", True
    ):
        raise ValueError(
            f"swap_attention: {type(model).__name__} restricts attention to its own window "
            f"(config.sliding_window={config.sliding_window}), which swapped variants do not see; set "
            "config.sliding_window = None before swapping (the window then comes from the variant)"
        )
    targets = _swap_targets(model)
    causal = any(c for _, _, c in targets)
    _check_causal(model, name, cls, causal)
    mixer = issubclass(cls, TokenMixer)
    interface = not mixer and all(routes_through_interface(m) for _, m, _ in targets)
    if mixer and config.model_type not in ("bert", "roberta"):
        raise ValueError(
            f"token mixer {name!r} replaces encoder self-attention; it supports BERT and RoBERTa only"
        )
    if not mixer and not interface and config.model_type not in ("bert", "roberta"):
        raise ValueError(
            f"swap_attention: {type(model).__name__}'s attention does not run through transformers' "
            "AttentionInterface in this transformers version; upgrade transformers (>= 5)"
        )
    # max_length (Linformer, Mixer) defaults to the model's position limit; a user's value wins.
    build_options = {k: v for k, v in options.items() if k != "max_length"}
    max_length = options.get("max_length", getattr(config, "max_position_embeddings", None))
    for path, module, target_causal in targets:
        heads, head_dim = _head_shape(module, config)
        variant = build_attention(
            name, num_heads=heads, head_dim=head_dim, max_length=max_length, **build_options
        )
        variant.to(device=_device_of(module)).train(module.training)
        if any(True for _ in variant.parameters()):
            # New, randomly initialised parameters (Linformer projections, Synthesizer logits, Mixer MLPs)
            # must train: mark them as tuner state so a PEFT callback keeps them trainable and saves them.
            mark(variant)
        if mixer:
            _set_parent(model, path, TokenMixerSelfAttention(variant))
        elif interface:
            module.attention_variant = variant
            module.attention_variant_causal = target_causal
        else:
            _set_parent(model, path, VariantSelfAttention(module, variant, target_causal))

    uses_interface = interface or (mixer and all(routes_through_interface(m) for _, m, _ in targets))
    if uses_interface:
        register_interface()
        _set_implementation(model)
    report = SwapReport(
        variant=name,
        options=dict(options),
        model_type=config.model_type,
        route="attention_interface" if interface else "module",
        causal=causal,
        modules=tuple(path for path, _, _ in targets),
    )
    object.__setattr__(model, _SWAP_ATTR, report)
    return report


def _check_positions(config: Any) -> None:
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise ValueError(
            f"swap_attention: position_embedding_type={config.position_embedding_type!r} adds "
            "relative-position scores inside attention, which the variants cannot take; use absolute "
            "position embeddings"
        )


def _check_causal(model: nn.Module, name: str, cls: type[AttentionVariant], causal: bool) -> None:
    if causal and not cls.capabilities.causal:
        causal_ok = [n for n in available_attention() if get_attention(n).capabilities.causal]
        raise ValueError(
            f"{type(model).__name__} is a causal (decoder) model but attention variant {name!r} cannot do "
            f"causal attention; choose one of: {', '.join(causal_ok)}"
        )


def swapped(model: nn.Module) -> SwapReport | None:
    """The report of the swap applied to ``model``, or ``None``."""
    return getattr(model, _SWAP_ATTR, None)


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _set_implementation(model: nn.Module) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        with contextlib.suppress(ValueError, KeyError):  # fall back to setting the config below
            setter(INTERFACE_KEY)
    if model.config._attn_implementation != INTERFACE_KEY:
        model.config._attn_implementation = INTERFACE_KEY
