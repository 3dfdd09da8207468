"""Stepping an encoder's blocks one at a time, family by family.

Early exit needs the hidden state after every block and the freedom to run the next block on a subset of
the batch, so it cannot call the model's own ``forward``. What differs between encoder families is small
and lives in :data:`_FAMILIES`: how the embedding module is called, an optional projection after it
(ALBERT's ``embedding_hidden_mapping_in``, ELECTRA's ``embeddings_project``), and which module runs at
each depth (ALBERT applies one shared layer group ``num_hidden_layers`` times). Where the embeddings and
the block stack sit comes from the model-layout registry.

The attention mask is built as the model builds it: ``transformers.masking_utils.create_bidirectional_mask``
from the model config and the 2-D padding mask, so the attention implementation in use (eager, SDPA, a
swapped variant or prefix tuning's wrapper, each with its own mask function) gets the mask it expects. It
is rebuilt whenever the batch shrinks.

Forward pre-hooks of the Hugging Face model (prompt tuning turns ``input_ids`` into ``inputs_embeds`` and
extends the mask, prefix tuning shifts positions) run on the inputs first, as ``model(**batch)`` would run
them; hooks on the embeddings and on the blocks run because those modules are called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_peft.layouts import find_hf_model, find_stacks, get_layout

__all__ = ["Encoder", "resolve_encoder"]

Embed = Callable[[nn.Module, dict[str, Any]], Tensor]


def _bert_embed(embeddings: nn.Module, inputs: dict[str, Any]) -> Tensor:
    return embeddings(
        input_ids=inputs.get("input_ids"),
        token_type_ids=inputs.get("token_type_ids"),
        position_ids=inputs.get("position_ids"),
        inputs_embeds=inputs.get("inputs_embeds"),
    )


def _distilbert_embed(embeddings: nn.Module, inputs: dict[str, Any]) -> Tensor:
    return embeddings(inputs.get("input_ids"), inputs.get("inputs_embeds"), inputs.get("position_ids"))


@dataclass(frozen=True)
class _Family:
    """How to step one encoder family: its embedding call and the projection after it (a path relative to
    the base model, or None). Where the embeddings and blocks sit, and ALBERT's shared depth, come from the
    family's layout."""

    embed: Embed
    projection: str | None = None


_FAMILIES: dict[str, _Family] = {
    "bert": _Family(_bert_embed),
    "roberta": _Family(_bert_embed),
    "xlm-roberta": _Family(_bert_embed),
    "camembert": _Family(_bert_embed),
    "electra": _Family(_bert_embed, projection="embeddings_project"),
    "distilbert": _Family(_distilbert_embed),
    "albert": _Family(_bert_embed, projection="encoder.embedding_hidden_mapping_in"),
}


@dataclass
class Encoder:
    """An encoder resolved for stepping.

    Attributes:
        hf: the Hugging Face model that holds the encoder.
        hf_name: its dotted path inside the model given by the user ('' if that model itself).
        base: ``hf.base_model`` (the bare encoder).
        embeddings: the embedding module.
        projection: a module applied right after the embeddings, or None.
        blocks: the module run at each depth ``0 .. num_layers - 1`` (ALBERT: its layer groups, repeated).
        embed: the family's embedding call.
    """

    hf: nn.Module
    hf_name: str
    base: nn.Module
    embeddings: nn.Module
    projection: nn.Module | None
    blocks: list[nn.Module]
    embed: Embed

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


def resolve_encoder(model: nn.Module) -> Encoder:
    """Find the encoder inside ``model`` (through the layout registry) and what is needed to step it.

    Raises:
        ValueError: no Hugging Face model, a family without a layout (the message says how to register
            one), a causal or encoder-decoder model, or a family whose embedding call is unknown here.
    """
    owner = "early exit"
    hf_name, hf = find_hf_model(model, owner=owner)
    layout = get_layout(model, owner=owner)
    encoders = [s for s in find_stacks(model, owner=owner) if s.role == "encoder" and not s.causal]
    if not encoders or layout.encoder_decoder:
        raise ValueError(
            "early exit supports bidirectional encoders (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, "
            f"DistilBERT, ALBERT); {layout.family!r} here is a causal (decoder) or encoder-decoder model, "
            "whose sequence classification early exit does not implement"
        )
    if layout.family not in _FAMILIES:
        raise ValueError(
            f"early exit does not know how to call the embeddings of family {layout.family!r} (known: "
            f"{', '.join(sorted(_FAMILIES))}); register it with "
            "lightning_peft.early_exit.stepping.register_family(model_type, embed, projection=...)"
        )
    spec, stack, base = _FAMILIES[layout.family], encoders[0], hf.base_model
    if stack.layout.shared_depth:
        # ALBERT: num_hidden_layers applications of its layer groups, picked as AlbertTransformer does. The
        # stack is group 0's layers, so the groups are its grandparent.
        groups = base.get_submodule(stack.layout.path.rsplit(".", 2)[0])
        n = stack.depth
        blocks = [groups[int(i / (n / len(groups)))] for i in range(n)]
    else:
        blocks = list(stack.blocks)
    projection = _optional(base, spec.projection)
    return Encoder(hf, hf_name, base, base.get_submodule(layout.embeddings), projection, blocks, spec.embed)


def register_family(model_type: str, embed: Embed, *, projection: str | None = None) -> None:
    """Teach early exit a new encoder family: ``embed(embeddings, inputs) -> (B, T, H)`` and an optional
    projection module path (relative to the base model) applied after it. The block stack comes from the
    family's layout (:func:`lightning_peft.layouts.register_layout`)."""
    _FAMILIES[model_type] = _Family(embed, projection)


def _optional(base: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    try:
        return base.get_submodule(path)
    except AttributeError:
        return None  # ELECTRA has embeddings_project only when embedding_size != hidden_size


def run_pre_hooks(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Apply ``module``'s forward pre-hooks to keyword inputs, in registration order, as a call would."""
    args: tuple[Any, ...] = ()
    for hook_id, hook in module._forward_pre_hooks.items():
        if hook_id in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, kwargs)
            if result is not None:
                args, kwargs = result
        else:
            result = hook(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    if args:
        raise ValueError("a forward pre-hook of the model turned keyword inputs into positional ones")
    return dict(kwargs)


def block_output(output: Any) -> Tensor:
    """A block's hidden states, whether it returns a tensor (transformers 5) or a tuple (4.x)."""
    return output[0] if isinstance(output, (tuple, list)) else output
