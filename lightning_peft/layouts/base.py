"""The layout dataclasses, the registry and the functions that resolve a layout in a concrete model
(see :mod:`lightning_peft.layouts`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from torch import nn

__all__ = [
    "BLOCK_PARTS",
    "BlockLayout",
    "ModelLayout",
    "ResolvedStack",
    "StackLayout",
    "available_layouts",
    "block_part_names",
    "find_hf_model",
    "find_stacks",
    "get_layout",
    "layout_of",
    "register_layout",
    "resolve_path",
    "with_block",
]

#: The block parts a tuner can ask for by name (fields of :class:`BlockLayout` holding a path).
BLOCK_PARTS = ("attention", "attention_output", "attention_norm", "ffn_input", "ffn_output", "ffn_norm")


@dataclass(frozen=True)
class BlockLayout:
    """Where things sit inside one transformer block (paths relative to the block).

    Attributes:
        attention: the self-attention module (the one whose class is in ``attention_classes``).
        attention_classes: class names of that module across transformers versions.
        query, key, value: the projections, relative to ``attention`` (GPT-2's fused ``c_attn`` is all three).
        attention_output: the projection after attention (Houlsby's first adapter site).
        attention_norm: the LayerNorm belonging to the attention sub-layer.
        ffn_input: the FFN's first projection (the parallel adapter reads its input).
        ffn_output: the FFN's output projection (Pfeiffer's and Houlsby's second adapter site).
        ffn_norm: the LayerNorm belonging to the FFN sub-layer.
        cross_attention: the cross-attention module of an encoder-decoder's decoder block, if any.
        ffn: every projection of the FFN (BitFit ``"ffn"``); default: ``ffn_input`` and ``ffn_output``.
    """

    attention: str
    attention_classes: tuple[str, ...]
    query: str
    key: str
    value: str
    attention_output: str
    attention_norm: str
    ffn_input: str
    ffn_output: str
    ffn_norm: str
    cross_attention: str | None = None
    ffn: tuple[str, ...] = ()

    def ffn_projections(self) -> tuple[str, ...]:
        return self.ffn or (self.ffn_input, self.ffn_output)

    def attention_projections(self) -> tuple[str, ...]:
        """q, k, v and output projections, relative to the block (duplicates removed)."""
        qkv = [f"{self.attention}.{n}" for n in (self.query, self.key, self.value)]
        return tuple(dict.fromkeys([*qkv, self.attention_output]))


@dataclass(frozen=True)
class StackLayout:
    """One stack of blocks.

    Attributes:
        role: ``"encoder"`` or ``"decoder"``.
        path: the ``nn.ModuleList`` of blocks, relative to the backbone.
        block: the layout of each of its blocks.
        causal: whether its self-attention is causal; ``None``: read ``config.is_decoder`` (BERT can be
            built as a decoder).
        shared_depth: one block reused ``config.num_hidden_layers`` times (ALBERT's cross-layer sharing).
    """

    role: str
    path: str
    block: BlockLayout
    causal: bool | None = None
    shared_depth: bool = False

    def __post_init__(self) -> None:
        if self.role not in ("encoder", "decoder"):
            raise ValueError(f"StackLayout.role must be 'encoder' or 'decoder', got {self.role!r}")


@dataclass(frozen=True)
class ModelLayout:
    """Everything the library needs to know about one model family.

    Attributes:
        family: the ``config.model_type`` this layout was written for.
        stacks: the block stacks, in forward order (encoder before decoder).
        embeddings: the module that embeds the input ids, relative to the backbone: an ``nn.Embedding``
            (GPT-2's ``wte``, Llama's ``embed_tokens``) or the family's embeddings block (BERT's
            ``embeddings``: word + position + type embeddings, LayerNorm, dropout).
        lora_targets: LoRA's default ``target_modules`` (suffixes).
    """

    family: str
    stacks: tuple[StackLayout, ...]
    embeddings: str
    lora_targets: tuple[str, ...]

    @property
    def encoder_decoder(self) -> bool:
        return {s.role for s in self.stacks} == {"encoder", "decoder"}


_LAYOUTS: dict[str, ModelLayout] = {}


def register_layout(model_type: str, layout: ModelLayout, *, replace: bool = False) -> None:
    """Teach the library a model family: every tuner, AdapterDrop, early exit and attention swapping then
    find its blocks. ``model_type`` is the Hugging Face ``config.model_type``.

    Raises:
        ValueError: the family is registered already (pass ``replace=True`` to override it).
    """
    if not isinstance(layout, ModelLayout):
        raise TypeError(f"register_layout takes a ModelLayout, got {type(layout).__name__}")
    if model_type in _LAYOUTS and not replace and _LAYOUTS[model_type] != layout:
        raise ValueError(f"a layout for {model_type!r} is registered already; pass replace=True to override")
    _LAYOUTS[model_type] = layout


def available_layouts() -> list[str]:
    """The registered ``model_type`` names."""
    return sorted(_LAYOUTS)


# -- finding the model -------------------------------------------------------------------------------------
def _is_hf_model(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return isinstance(getattr(config, "model_type", None), str) and hasattr(module, "base_model_prefix")


def find_hf_model(model: nn.Module, *, owner: str | None = None) -> tuple[str, nn.Module]:
    """The outermost Hugging Face ``PreTrainedModel`` in ``model`` (itself, a LightningModule's attribute,
    the backbone of a wrapper) and its dotted path (``""`` when ``model`` is one).

    Raises:
        ValueError: none found (the message names ``owner``, the caller).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner or 'lightning_peft'}: expected an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if _is_hf_model(module):
            return name, module
    raise ValueError(
        f"{owner or 'lightning_peft'}: no Hugging Face transformers model (a PreTrainedModel with a .config) "
        f"inside {type(model).__name__}"
    )


def layout_of(model: nn.Module) -> ModelLayout | None:
    """The registered layout of the Hugging Face model in ``model``, or ``None`` (unknown family or no
    Hugging Face model)."""
    try:
        _, hf = find_hf_model(model)
    except ValueError:
        return None
    return _LAYOUTS.get(hf.config.model_type)


def get_layout(model: nn.Module, *, owner: str | None = None) -> ModelLayout:
    """The registered layout of the Hugging Face model in ``model``.

    Raises:
        ValueError: no Hugging Face model, or a family with no layout (the message says how to register one).
    """
    try:
        _, hf = find_hf_model(model, owner=owner)
    except ValueError as err:
        raise ValueError(
            f"{err}. Without one its blocks cannot be found: pass target_modules=[...] with module names "
            "where the method takes them"
        ) from None
    family = hf.config.model_type
    if family not in _LAYOUTS:
        raise ValueError(
            f"{owner or 'lightning_peft'}: model family {family!r} ({type(hf).__name__}) has no registered "
            f"layout. Known: {', '.join(available_layouts())}. Register one with "
            "lightning_peft.layouts.register_layout(model_type, ModelLayout(...)) (see the README), or pass "
            "target_modules=[...] with module names where the method takes them."
        )
    return _LAYOUTS[family]


def resolve_path(root: nn.Module, path: str) -> str | None:
    """The first alternative of ``path`` (``"a|b"``) that names a submodule of ``root``, else ``None``."""
    for candidate in path.split("|"):
        try:
            root.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


@dataclass(frozen=True)
class ResolvedStack:
    """A block stack found in a concrete model.

    Attributes:
        name: dotted path of the ``nn.ModuleList`` from the root the search started at.
        blocks: the ``nn.ModuleList`` itself.
        layout: its :class:`StackLayout`.
        causal: whether its self-attention is causal in this model.
        depth: how many times blocks run (``len(blocks)``, or ``num_hidden_layers`` with shared depth).
    """

    name: str
    blocks: nn.ModuleList
    layout: StackLayout
    causal: bool
    depth: int
    hf_config: object = field(repr=False, default=None)

    @property
    def role(self) -> str:
        return self.layout.role

    def block_names(self) -> list[str]:
        """Qualified names of the stack's block modules."""
        return [f"{self.name}.{i}" if self.name else str(i) for i in range(len(self.blocks))]

    def parts(self, part: str) -> Iterator[tuple[str, nn.Module]]:
        """``(qualified name, module)`` of block part ``part`` (a :data:`BLOCK_PARTS` name) in every block
        that has it."""
        rel = getattr(self.layout.block, part)
        for name, block in zip(self.block_names(), self.blocks, strict=True):
            found = resolve_path(block, rel)
            if found is not None:
                yield f"{name}.{found}", block.get_submodule(found)


def find_stacks(
    model: nn.Module, *, role: str | None = None, owner: str | None = None
) -> list[ResolvedStack]:
    """The block stacks of the Hugging Face model in ``model`` (encoder first), named from ``model``'s root.

    Args:
        role: only the ``"encoder"`` or ``"decoder"`` stacks.

    Raises:
        ValueError: unknown family (how to register it), or a registered stack path missing in this model.
    """
    layout = get_layout(model, owner=owner)
    hf_name, hf = find_hf_model(model, owner=owner)
    backbone = getattr(hf, "base_model", hf)
    base_name = next((n for n, m in model.named_modules() if m is backbone), hf_name)
    config = hf.config
    out = []
    for stack in layout.stacks:
        if role is not None and stack.role != role:
            continue
        try:
            blocks = backbone.get_submodule(stack.path)
        except AttributeError:
            raise ValueError(
                f"{owner or 'lightning_peft'}: the {layout.family!r} layout says blocks sit at "
                f"{stack.path!r} under {type(backbone).__name__}, which has no such module; fix the layout "
                "with register_layout(..., replace=True)"
            ) from None
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"{stack.path!r} in {type(backbone).__name__} is not an nn.ModuleList")
        causal = stack.causal if stack.causal is not None else bool(getattr(config, "is_decoder", False))
        depth = int(config.num_hidden_layers) if stack.shared_depth else len(blocks)
        name = f"{base_name}.{stack.path}" if base_name else stack.path
        out.append(ResolvedStack(name, blocks, stack, causal, depth, config))
    return out


def block_part_names(model: nn.Module, parts: str | Sequence[str], *, owner: str | None = None) -> list[str]:
    """Qualified names of the block parts ``parts`` (``"attention_output"``, ``"ffn_output"``, ...; or
    ``"attention_projections"`` / ``"ffn_projections"``) in every block of every stack, in model order.

    Raises:
        ValueError: the model's family has no layout (the message says how to register one).
    """
    wanted: set[str] = set()
    for part in [parts] if isinstance(parts, str) else parts:
        for stack in find_stacks(model, owner=owner):
            if part in BLOCK_PARTS:
                wanted |= {n for n, _ in stack.parts(part)}
                continue
            rels = getattr(stack.layout.block, part)()
            for block_name, block in zip(stack.block_names(), stack.blocks, strict=True):
                found = (resolve_path(block, rel) for rel in rels)
                wanted |= {f"{block_name}.{f}" for f in found if f is not None}
    return [name for name, _ in model.named_modules() if name in wanted]


def with_block(layout: BlockLayout, **changes: object) -> BlockLayout:
    """A copy of ``layout`` with some fields changed (for families that differ in one name)."""
    return dataclasses.replace(layout, **changes)  # type: ignore[arg-type]
