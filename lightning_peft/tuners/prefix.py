"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every self-attention layer ``i`` gets ``l`` learned key and value vectors ``P_k^i, P_v^i`` (l x w, with
``w = heads * head_dim``) that every query attends to next to the real keys:
``softmax(q [P_k; K]^T / sqrt(D)) [P_v; V]``. During training the prefixes may come from an MLP over
``l`` learned embeddings (``projection=True``: ``E (l x w) -> Linear(w, h) -> tanh -> Linear(h, 2 L w)``),
which the paper found more stable; :func:`fold_prefix` afterwards replaces the MLP by its output (plain
prefixes, ``2 L l w`` numbers, outputs unchanged).

Injection is at the attention level, not through ``past_key_values``: the model's attention function is
wrapped through ``transformers.AttentionInterface`` (key ``"lightning_peft_prefix"``, with a matching
``AttentionMaskInterface`` entry that hands over the compact key-padding mask). The wrapper prepends layer
``i``'s prefix to the key/value states it receives (after the KV cache update, so generation with a cache
works and the cache holds real tokens only), extends the mask with ``l`` always-visible keys (causality is
bottom-right aligned), and runs dense SDPA, or, when an efficient variant was swapped in first
(:func:`lightning_peft.attention.swap_attention`), that variant with ``num_prefix`` keys; variants without
``capabilities.prefix_keys`` are refused at injection.

Positions: as in Li & Liang's and Hugging Face PEFT's ``past_key_values`` implementations, the real tokens
start at position ``l`` (``shift_positions=True``); with ``False`` they keep the positions they would have
without a prefix. The tensor layout and names (``prompt_encoder.embedding``, ``.transform``) follow PEFT, so
its prefix weights move over as they are. Supported: BERT/RoBERTa (encoder or decoder), GPT-2, Llama,
Mistral, Qwen2, and T5 / mT5 (encoder-decoder).

Encoder-decoder models (T5): Li & Liang prepend prefixes to the encoder's self-attention, the decoder's
self-attention and the cross-attention; ``sites`` picks which of ``"encoder_self"``, ``"decoder_self"`` and
``"cross"`` get one (default: all three). Hugging Face PEFT's prefix tuning on T5 reaches the decoder's
self-attention only (``sites=("decoder_self",)``). T5 has no position embeddings: its relative position
bias is added to the attention scores, so the prefix keys get the bias of positions ``0 .. l-1`` with the
real tokens at ``l, l+1, ...`` (what PEFT's cached prefixes get), or no bias with ``shift_positions=False``;
cross-attention has no position bias.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.attention.base import available_attention, get_attention
from lightning_peft.attention.interface import routes_through_interface
from lightning_peft.attention.swap import swapped
from lightning_peft.config import TunerConfig, check_choice, check_positive, register_tuner
from lightning_peft.layers import OwnsHooks, like, mark
from lightning_peft.layouts import find_stacks
from lightning_peft.tuners.prefix_attention import (
    LAYER_ATTR,
    PREFIX_KEY,
    Site,
    register_prefix_attention,
)
from lightning_peft.tuners.prompt import (
    PROMPT_ATTR,
    _cache_length,
    _check_tokens,
    call_kwargs,
    check_prompt_fields,
    hf_root,
)

__all__ = ["PREFIX_KEY", "PrefixEncoder", "PrefixTuningConfig", "fold_prefix", "inject_prefix"]


#: Attention sites of an encoder-decoder model (Li & Liang's three prefixes).
PREFIX_SITES = ("encoder_self", "decoder_self", "cross")


class PrefixEncoder(OwnsHooks, nn.Module):
    """Per-layer prefixes: ``layer_kv(i)`` is ``(2, H, l, D)`` (keys, values) for attention layer ``i``.

    ``embedding.weight`` is ``(l, 2 L w)`` (plain) or ``(l, w)`` with the ``transform`` MLP; the output's
    last axis is laid out ``(L, 2, H, D)`` (layer, key/value, head, head dim).
    """

    def __init__(self, n: int, layers: int, heads: int, head_dim: int, hidden: int | None) -> None:
        super().__init__()
        self.num_virtual_tokens, self.num_layers, self.heads, self.head_dim = n, layers, heads, head_dim
        width = heads * head_dim
        self.transform: nn.Sequential | None = None
        if hidden is None:
            self.embedding = nn.Embedding(n, layers * 2 * width)
        else:
            self.embedding = nn.Embedding(n, width)
            self.transform = nn.Sequential(
                nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, layers * 2 * width)
            )
        self.disabled = False
        self.shift_positions = True
        self.causal = False
        #: Positions enter the attention scores (T5's relative bias): the shift happens in the attention
        #: function, the model takes no ``position_ids``.
        self.relative_positions = False
        self._layers: list[nn.Module] = []  # attention modules holding a Site entry (plain references)
        self._prior: list[tuple[Any, str | None]] = []  # (config, attention implementation before us)
        mark(self)

    def restore(self) -> None:
        """Undo the rest of :func:`inject_prefix` (:class:`~lightning_peft.layers.Restorable`): the layers'
        prefix entries and every config's attention implementation."""
        for layer in self._layers:
            layer.__dict__.pop(LAYER_ATTR, None)
        self._layers = []
        for config, prior in self._prior:
            config._attn_implementation = prior
        self._prior = []

    def layer_kv(self, i: int) -> Tensor:
        w2 = 2 * self.heads * self.head_dim
        rows = slice(i * w2, (i + 1) * w2)
        if self.transform is None:
            flat = self.embedding.weight[:, rows]  # (l, 2w)
        else:  # only layer i's slice of the output projection: one MLP's cost over all layers
            hidden = self.transform[1](self.transform[0](self.embedding.weight))  # (l, h)
            out = self.transform[2]
            flat = F.linear(hidden, out.weight[rows], out.bias[rows])  # (l, 2w)
        return flat.view(-1, 2, self.heads, self.head_dim).permute(1, 2, 0, 3)  # (2, H, l, D)

    def all_prefixes(self) -> Tensor:
        """``(l, 2 L w)``: every layer's prefix, the plain (folded) table."""
        if self.transform is None:
            return self.embedding.weight
        return self.transform(self.embedding.weight)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by its output: plain prefixes, same attention inputs."""
        if self.transform is None:
            return
        table = self.all_prefixes().detach().clone()
        self.embedding = nn.Embedding(*table.shape, device=table.device, dtype=table.dtype)
        self.embedding.weight.copy_(table)
        self.transform = None
        self.embedding.weight.requires_grad_(True)

    def shift(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Forward pre-hook on the Hugging Face model: real tokens start at position ``l``."""
        if model.config._attn_implementation != PREFIX_KEY:
            raise RuntimeError(
                f"prefix tuning runs through the attention implementation {PREFIX_KEY!r}, but the model now "
                f"uses {model.config._attn_implementation!r} (attention swapped after injection?): swap the "
                "attention first, then inject the prefix"
            )
        if self.disabled or not self.shift_positions or self.relative_positions:
            return args, kwargs
        kwargs = call_kwargs(model, args, kwargs)
        pos = kwargs.get("position_ids")
        if pos is None:
            ref = kwargs.get("input_ids")
            ref = ref if ref is not None else kwargs.get("inputs_embeds")
            if ref is None:
                return (), kwargs
            past = _cache_length(kwargs.get("past_key_values"))
            pos = torch.arange(past, past + ref.shape[1], device=ref.device)[None]
        return (), {**kwargs, "position_ids": pos + self.num_virtual_tokens}

    def extra_repr(self) -> str:
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, layers={self.num_layers}, "
            f"projection={self.transform is not None}"
        )


def _check_swap(root: nn.Module) -> None:
    report = swapped(root)
    if report is None:
        return
    caps = get_attention(report.variant).capabilities
    if report.route != "attention_interface" or not caps.prefix_keys:
        raise ValueError(
            f"prefix tuning cannot run on this model: its attention was swapped to {report.variant!r} "
            f"(route {report.route!r}), which cannot take prefix keys (capabilities.prefix_keys is False). "
            "Swap to a variant that can: "
            + ", ".join(n for n in available_attention() if get_attention(n).capabilities.prefix_keys)
        )


def _bias_owner(root: nn.Module, path: str) -> nn.Module | None:
    """The module holding the relative position bias table of ``path``'s stack (T5: block 0's
    self-attention; the other layers reuse its bias), or ``None`` when the model has none."""
    stack = path.split(".block.", 1)[0] if ".block." in path else ""
    for name, m in root.named_modules():
        if name.startswith(stack) and getattr(m, "has_relative_attention_bias", False):
            return m
    return None


def _attention_sites(
    root: nn.Module, sites: tuple[str, ...] | None, owner: str
) -> list[tuple[str, nn.Module, str, bool]]:
    """``(path, module, site, causal)`` of every attention module that gets a prefix, in model order: each
    block's self-attention, then its cross-attention (encoder-decoders), from the model's layout."""
    stacks = find_stacks(root, owner=owner)
    encoder_decoder = bool(getattr(root.config, "is_encoder_decoder", False))
    if not encoder_decoder and sites is not None:
        raise ValueError(
            f"{owner}.sites applies to encoder-decoder models; {type(root).__name__} has one stack: "
            "leave sites=None (every self-attention layer gets a prefix)"
        )
    chosen = PREFIX_SITES if sites is None else sites
    found = []
    for stack in stacks:
        layout = stack.layout.block
        self_site = f"{stack.role}_self" if encoder_decoder else "self"
        for block_name, block in zip(stack.block_names(), stack.blocks, strict=True):
            attention = block.get_submodule(layout.attention)
            if type(attention).__name__ not in layout.attention_classes:
                raise ValueError(
                    f"{owner}: {block_name}.{layout.attention} is a {type(attention).__name__}, not the "
                    f"attention the layout names ({', '.join(layout.attention_classes)}); was it replaced?"
                )
            if self_site == "self" or self_site in chosen:
                found.append((f"{block_name}.{layout.attention}", attention, self_site, stack.causal))
            if layout.cross_attention and "cross" in chosen:
                path = f"{block_name}.{layout.cross_attention}"
                found.append((path, block.get_submodule(layout.cross_attention), "cross", False))
    return found


def inject_prefix(
    model: nn.Module,
    n: int,
    hidden: int | None,
    *,
    shift_positions: bool = True,
    sites: tuple[str, ...] | None = None,
    owner: str = "PrefixTuningConfig",
) -> str:
    """Attach a :class:`PrefixEncoder` to the attention layers of the Hugging Face model in ``model``:
    every self-attention layer, or, in an encoder-decoder model, those of ``sites`` (default all).

    Returns the qualified name of the prefix module.
    """
    root = hf_root(model, owner, encoder_decoder=True)
    config = root.config
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise ValueError(
            f"{owner}: relative position scores (position_embedding_type) cannot cover prefix keys"
        )
    found = _attention_sites(root, sites, owner)
    layers = [m for _, m, _, _ in found]
    if not layers or not all(routes_through_interface(m) for m in layers):
        raise ValueError(
            f"{owner}: {type(root).__name__}'s attention does not run through AttentionInterface "
            "(transformers too old for this family?)"
        )
    _check_swap(root)
    if PROMPT_ATTR in root._modules:
        raise ValueError(f"{owner}: {type(root).__name__} already has a {PROMPT_ATTR!r} module")
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    first = layers[0]
    head_dim = (
        getattr(first, "head_dim", None)
        or getattr(first, "attention_head_size", None)
        or getattr(first, "key_value_proj_dim", None)
    )
    encoder = PrefixEncoder(n, len(layers), int(kv_heads), int(head_dim), hidden)
    weight = root.get_input_embeddings().weight
    like(encoder, weight)
    encoder.shift_positions = shift_positions
    encoder.causal = any(causal for _, _, site, causal in found if site == "self")
    encoder.relative_positions = any(hasattr(m, "relative_attention_bias") for m in root.modules())
    root.add_module(PROMPT_ATTR, encoder)
    for i, (path, layer, site, causal) in enumerate(found):
        # encoder-decoder: causality and the bias table belong to the site; cross-attention has no bias
        bias_owner = None if site in ("self", "cross") else _bias_owner(root, path)
        layer.__dict__[LAYER_ATTR] = Site(encoder, i, causal, bias_owner)  # plain reference: no submodule
        encoder._layers.append(layer)
    encoder.keep(root.register_forward_pre_hook(encoder.shift, with_kwargs=True))
    # A variant swapped in before (INTERFACE_KEY) is reached from inside the wrapper.
    register_prefix_attention()
    configs = {id(c): c for m in root.modules() if (c := getattr(m, "config", None)) is not None}
    # Sub-configs too: T5's encoder and decoder stacks keep their own copies.
    encoder._prior = [(c, getattr(c, "_attn_implementation", None)) for c in configs.values()]
    setter = getattr(root, "set_attn_implementation", None)
    if callable(setter):
        with contextlib.suppress(ValueError, KeyError):
            setter(PREFIX_KEY)
    for config_ in configs.values():
        if getattr(config_, "_attn_implementation", PREFIX_KEY) != PREFIX_KEY:
            config_._attn_implementation = PREFIX_KEY
    path = next(name for name, m in model.named_modules() if m is root)
    return f"{path}.{PROMPT_ATTR}" if path else PROMPT_ATTR


def fold_prefix(model: nn.Module) -> None:
    """Fold the prefix MLP of every :class:`PrefixEncoder` in ``model`` into plain prefixes."""
    encoders = [m for m in model.modules() if isinstance(m, PrefixEncoder)]
    if not encoders:
        raise ValueError(f"{type(model).__name__} has no prefix-tuning prefixes to fold")
    for encoder in encoders:
        encoder.fold()


@register_tuner("prefix")
@dataclass(kw_only=True)
class PrefixTuningConfig(TunerConfig):
    """Prefix tuning hyper-parameters.

    Attributes:
        num_virtual_tokens: prefix length ``l`` (> 0) per layer.
        projection: produce the prefixes with an MLP during training (fold it with :func:`fold_prefix`).
        encoder_hidden_size: the MLP's hidden width ``h``.
        shift_positions: real tokens start at position ``l`` (Li & Liang, PEFT); ``False`` keeps positions.
        sites: encoder-decoder models only: which of ``"encoder_self"``, ``"decoder_self"``, ``"cross"``
            get prefixes (``None``: all three, as in Li & Liang; ``["decoder_self"]`` is what Hugging Face
            PEFT prefixes on T5).

    Example::

        PrefixTuningConfig(num_virtual_tokens=30, projection=True, encoder_hidden_size=512)
        PrefixTuningConfig(num_virtual_tokens=10, sites=["decoder_self"])  # T5, PEFT's placement
    """

    #: Untrained prefix keys still take attention weight: outputs change.
    identity_at_init = False

    num_virtual_tokens: int = 20
    projection: bool = False
    encoder_hidden_size: int = 512
    shift_positions: bool = True
    sites: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_prompt_fields(self, "PrefixTuningConfig")
        _check_tokens("PrefixTuningConfig", self.num_virtual_tokens)
        check_positive("PrefixTuningConfig", "encoder_hidden_size", self.encoder_hidden_size)
        if self.sites is not None:
            if isinstance(self.sites, str) or not self.sites:
                raise ValueError(
                    f"PrefixTuningConfig.sites must be a non-empty list drawn from {list(PREFIX_SITES)}, "
                    f"got {self.sites!r}"
                )
            self.sites = list(self.sites)
            for site in self.sites:
                check_choice("PrefixTuningConfig", "sites", site, PREFIX_SITES)
            if len(set(self.sites)) != len(self.sites):
                raise ValueError(f"PrefixTuningConfig.sites lists a site twice: {self.sites}")

    def apply(self, model: nn.Module) -> list[str]:
        hidden = self.encoder_hidden_size if self.projection else None
        sites = None if self.sites is None else tuple(self.sites)
        return [
            inject_prefix(
                model, self.num_virtual_tokens, hidden, shift_positions=self.shift_positions, sites=sites
            )
        ]
