"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

``n`` learned virtual-token embeddings ``P`` (n x d) are prepended to the input embeddings of a frozen
model: ``[P; E(x)]``. Nothing inside the model changes; a forward pre-hook on the Hugging Face model turns
``input_ids`` into ``inputs_embeds`` with the prompt in front and keeps the other inputs consistent:

* ``attention_mask`` gains ``n`` leading ones, ``token_type_ids`` ``n`` leading zeros;
* ``position_ids`` (when given) become ``[0..n-1, p + n]``;
* ``labels`` of a decoder (``(B, T)`` token labels) gain ``n`` leading ``-100`` (no loss on virtual tokens);
* while generating with a filled KV cache the prompt already sits in the cache, so only the mask (``n``
  leading ones) and the positions (``+ n``) change.

Encoder-decoder models (T5): ``generate()`` runs the encoder directly, past any hook on the outer model, so
the prompt goes in through a pre-hook on the encoder (``model.get_encoder()``): virtual tokens in front of
the encoder input, the encoder's mask extended. A second pre-hook on the outer model extends the mask
the decoder's cross-attention reads (``attention_mask``, shorter by ``n`` than the encoder output, also
when ``encoder_outputs`` are passed, as during generation). The decoder, its inputs and labels are
untouched, as in Hugging Face PEFT's prompt tuning for ``SEQ_2_SEQ_LM``.

The outputs cover all ``n + T`` positions, as in Hugging Face PEFT (same parameter name
``prompt_encoder.embedding.weight``, so its tensors move over as they are). The prompt starts random or,
with ``init="text"``, from the embeddings of a text's tokens repeated or cut to length ``n``.

P-tuning (:mod:`lightning_peft.tuners.ptuning`) reuses the hook with an encoder producing the prompt.

The prompt module keeps the handles of its hooks (:class:`~lightning_peft.layers.HookOwner`), so
:func:`lightning_peft.unload` removes the hooks and the module and leaves the plain base model.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.config import TunerConfig, check_choice, check_positive, register_tuner
from lightning_peft.layers import OwnsHooks, like, mark
from lightning_peft.layouts import find_hf_model

__all__ = ["PromptEmbedding", "PromptTuningConfig", "VirtualTokens", "attach_virtual_tokens", "hf_root"]

#: Name of the child module holding the prompt, on the Hugging Face model (PEFT uses the same).
PROMPT_ATTR = "prompt_encoder"


def hf_root(model: nn.Module, owner: str, *, encoder_decoder: bool = False) -> nn.Module:
    """The outermost Hugging Face model inside ``model`` (itself or a child): the module to hook.

    Encoder-decoder models are refused unless ``encoder_decoder`` (the caller handles them)."""
    _, root = find_hf_model(model, owner=owner)
    if not callable(getattr(root, "get_input_embeddings", None)):
        raise ValueError(f"{owner} needs a transformer with input embeddings; {type(root).__name__} has none")
    if getattr(root.config, "is_encoder_decoder", False) and not encoder_decoder:
        raise ValueError(
            f"{owner}: encoder-decoder models ({root.config.model_type}) are not supported by this method"
        )
    return root


def check_prompt_fields(config: TunerConfig, owner: str) -> None:
    """Prompt-family tuners touch no module: refuse fields that would be silently ignored."""
    for name in ("target_modules", "exclude_modules", "layers"):
        if getattr(config, name) is not None:
            raise ValueError(
                f"{owner}.{name} must be None: this method adds virtual tokens at the input and "
                "adapts no module (modules_to_save still works for a task head)"
            )


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple-of-tuples cache: (B, H, T, D)


def call_kwargs(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A forward call's positional arguments turned into keywords (by ``model.forward``'s signature)."""
    if not args:
        return dict(kwargs)
    names = [
        p.name
        for p in inspect.signature(model.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return {**dict(zip(names, args, strict=False)), **kwargs}


class VirtualTokens(OwnsHooks, nn.Module):
    """Base of the prompt modules: ``forward()`` returns the ``(n, d)`` virtual-token embeddings; the
    pre-hook :meth:`insert` puts them in front of a Hugging Face model's inputs."""

    def __init__(self, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.disabled = False
        self.encoder_decoder = False  # hooked on an encoder-decoder's encoder (see the module docstring)

    def forward(self) -> Tensor:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def insert(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Forward pre-hook (``with_kwargs=True``) on the Hugging Face model ``model``."""
        if self.disabled:
            return args, kwargs
        kw = call_kwargs(model, args, kwargs)
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise ValueError("virtual tokens need input_ids or inputs_embeds")
        n, (B, T) = self.num_virtual_tokens, ref.shape[:2]
        device = ref.device
        if (mask := kw.get("attention_mask")) is not None:
            if mask.dim() != 2:
                raise ValueError(f"prompt tuning takes a 2-D attention_mask, got shape {tuple(mask.shape)}")
            # An encoder-decoder's outer hook may have extended it already (an encoder has no cache, so
            # the lengths tell): otherwise every call extends it.
            if not (self.encoder_decoder and mask.shape[1] == n + T):
                kw["attention_mask"] = torch.cat([mask.new_ones(B, n), mask], dim=1)
        pos = kw.get("position_ids")
        if _cache_length(kw.get("past_key_values")) > 0:  # generating: the prompt is already in the cache
            if pos is not None:
                kw["position_ids"] = pos + n
            return (), kw
        if pos is not None:
            lead = torch.arange(n, device=device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
            kw["position_ids"] = torch.cat([lead, pos + n], dim=-1)
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)  # (B, T, d)
        prompt = self().to(embeds.dtype)  # (n, d)
        kw["inputs_embeds"] = torch.cat([prompt.expand(B, n, -1), embeds], dim=1)  # (B, n + T, d)
        kw["input_ids"] = None
        if (types := kw.get("token_type_ids")) is not None:
            kw["token_type_ids"] = torch.cat([types.new_zeros(B, n), types], dim=1)
        labels = kw.get("labels")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == T:
            kw["labels"] = torch.cat([labels.new_full((B, n), -100), labels], dim=1)
        return (), kw

    def extend_encoder_mask(
        self, model: nn.Module, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        """Forward pre-hook on an encoder-decoder model: the ``attention_mask`` the decoder's
        cross-attention reads covers the virtual tokens the encoder hook inserts."""
        if self.disabled:
            return args, kwargs
        kw = call_kwargs(model, args, kwargs)
        mask, n = kw.get("attention_mask"), self.num_virtual_tokens
        if mask is None:
            return args, kwargs
        encoded = kw.get("encoder_outputs")
        if encoded is not None:
            length = encoded[0].shape[1]  # the prompt is already in the encoder output
        else:
            ref = kw.get("input_ids")
            ref = ref if ref is not None else kw.get("inputs_embeds")
            if ref is None:
                return args, kwargs
            length = n + ref.shape[1]
        if mask.shape[1] + n == length:
            kw["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        return (), kw

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}"


def attach_virtual_tokens(model: nn.Module, prompt: VirtualTokens, owner: str) -> str:
    """Register ``prompt`` on the Hugging Face model inside ``model`` and hook its forward.

    Returns the qualified name of the prompt module.
    """
    root = hf_root(model, owner, encoder_decoder=True)
    if PROMPT_ATTR in root._modules:
        raise ValueError(f"{owner}: {type(root).__name__} already has a {PROMPT_ATTR!r} module")
    root.add_module(PROMPT_ATTR, like(prompt, root.get_input_embeddings().weight))
    if getattr(root.config, "is_encoder_decoder", False):
        prompt.encoder_decoder = True
        prompt.keep(root.get_encoder().register_forward_pre_hook(prompt.insert, with_kwargs=True))
        prompt.keep(root.register_forward_pre_hook(prompt.extend_encoder_mask, with_kwargs=True))
    else:
        prompt.keep(root.register_forward_pre_hook(prompt.insert, with_kwargs=True))
    mark(prompt)
    path = next(name for name, m in model.named_modules() if m is root)
    return f"{path}.{PROMPT_ATTR}" if path else PROMPT_ATTR


class PromptEmbedding(VirtualTokens):
    """The prompt as a plain table: ``embedding.weight`` (n x d)."""

    def __init__(self, num_virtual_tokens: int, dim: int, init: Tensor | None = None) -> None:
        super().__init__(num_virtual_tokens)
        self.embedding = nn.Embedding(num_virtual_tokens, dim)
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def forward(self) -> Tensor:
        return self.embedding.weight  # (n, d)


def text_init_ids(tokenizer: Any, text: str, n: int) -> list[int]:
    """Token ids of ``text`` (with the special tokens the tokenizer adds) repeated or cut to ``n``."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError(f"init_text {text!r} tokenizes to no tokens")
    return (ids * math.ceil(n / len(ids)))[:n]


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object as is, or ``AutoTokenizer.from_pretrained(path)`` for a local path."""
    if not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer)


@register_tuner("prompt")
@dataclass(kw_only=True)
class PromptTuningConfig(TunerConfig):
    """Prompt tuning hyper-parameters.

    Attributes:
        num_virtual_tokens: prompt length ``n`` (> 0).
        init: ``"random"`` (N(0, 1) like ``nn.Embedding``) or ``"text"`` (embeddings of ``init_text``'s
            tokens, repeated or cut to ``n``).
        init_text: the text for ``init="text"``.
        tokenizer: for ``init="text"``: a tokenizer object (called as ``tokenizer(text)["input_ids"]``)
            or a local path for ``transformers.AutoTokenizer.from_pretrained``.

    Example::

        PromptTuningConfig(num_virtual_tokens=8, init="text", init_text="Classify the sentiment:",
                           tokenizer="path/to/model", modules_to_save=["classifier"])
    """

    #: An untrained prompt still adds ``n`` positions and attention targets: outputs change.
    identity_at_init = False

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_prompt_fields(self, "PromptTuningConfig")
        check_choice("PromptTuningConfig", "init", self.init, ["random", "text"])
        _check_tokens("PromptTuningConfig", self.num_virtual_tokens)
        if self.init == "text":
            if not self.init_text:
                raise ValueError("PromptTuningConfig.init='text' needs init_text (the starting text)")
            if self.tokenizer is None:
                raise ValueError(
                    "PromptTuningConfig.init='text' needs a tokenizer (a tokenizer object or a local path) "
                    "to turn init_text into token ids; the model alone has none"
                )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out["tokenizer"] is not None and not isinstance(out["tokenizer"], str):
            out["tokenizer"] = getattr(self.tokenizer, "name_or_path", None) or type(self.tokenizer).__name__
        return out

    def apply(self, model: nn.Module) -> list[str]:
        root = hf_root(model, "PromptTuningConfig", encoder_decoder=True)
        embeddings = root.get_input_embeddings()
        init = None
        if self.init == "text":
            if embeddings.weight.is_meta:
                raise ValueError(
                    "PromptTuningConfig(init='text') copies the embeddings of init_text's tokens, but the "
                    "model is on the meta device, where they have no values yet (and materialisation would "
                    "replace the prompt by a random one). Inject after the base weights are loaded, or use "
                    "init='random'"
                )
            ids = text_init_ids(load_tokenizer(self.tokenizer), str(self.init_text), self.num_virtual_tokens)
            with torch.no_grad():
                init = embeddings(torch.tensor(ids, device=embeddings.weight.device)).detach().clone()
        prompt = PromptEmbedding(self.num_virtual_tokens, embeddings.weight.shape[1], init)
        return [attach_virtual_tokens(model, prompt, "PromptTuningConfig")]


def _check_tokens(owner: str, n: Any) -> None:
    if not isinstance(n, int) or isinstance(n, bool):
        raise ValueError(f"{owner}.num_virtual_tokens must be an int, got {n!r}")
    check_positive(owner, "num_virtual_tokens", n)
