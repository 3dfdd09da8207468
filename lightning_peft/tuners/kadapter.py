"""K-Adapter (Wang et al. 2021, "K-Adapter: Infusing Knowledge into Pre-Trained Models with Adapters").

Knowledge adapters are plug-ins *outside* the frozen base model: nothing inside the base changes, its
hidden states are only read. A knowledge adapter is a chain of adapter layers; adapter layer ``j`` reads
the hidden state of base block ``adapter_layers[j]`` (captured by a forward hook on that block) plus the
output of adapter layer ``j - 1`` (the sum, as in the authors' released code; the paper describes the
combination as a concatenation), and computes

    x = down(h_in);  x = TransformerEncoderLayer(x)  (num_transformer_layers times);  out = h_in + up(x)

Several knowledge adapters (e.g. factual and linguistic) are trained independently: each reads only the
base hidden states (detached: no gradient flows into the base or from one adapter to another) and its own
previous layer. The task head sees ``concat([base last hidden state, adapter_1 out, ..., adapter_k out])``,
of width ``H * (1 + k)``.

Workflow::

    inject(model, KAdapterConfig(name="factual", hidden=768))    # base frozen, only "factual" trains
    ...train...
    add_kadapter(model, KAdapterConfig(name="linguistic"))       # "factual" frozen, "linguistic" trains
    out = model(**batch).last_hidden_state                        # (B, T, H * 3)
    kadapter_features(model)                                      # {"factual": (B, T, H), ...}

With ``concat_output=True`` (the default) the model's ``last_hidden_state`` becomes that concatenation (its
first ``H`` channels are bitwise the base model's output; every other base output, e.g. ``pooler_output``
or ``hidden_states``, is untouched). With ``concat_output=False`` the model's outputs are exactly the
base model's and the features are read with :func:`kadapter_features` / :func:`kadapter_output` after the
forward.

Checkpoints: the whole :class:`KAdapterSet` is tuner state (:func:`~lightning_peft.layers.mark_state`), so
adapter-only checkpoints of the ``PEFT`` callback hold every knowledge adapter, the frozen ones too, and
:func:`kadapter_record` (configs in order, the trainable one) goes into their metadata;
:func:`restore_kadapters` adds the adapters a fresh model lacks before the weights load.
:func:`lightning_peft.unload` removes the hooks and the set (:class:`~lightning_peft.layers.HookOwner`).

Contract tests: an untrained K-Adapter is not the identity of the model's output (its output gains the
adapter channels), so ``identity_at_init = False``; the base part is checked separately, and
``disable_adapters`` returns exactly the base output. Only encoder-only and decoder-only models (whose
``last_hidden_state`` is aligned with the blocks' hidden states) are supported.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_peft.api import freeze_base
from lightning_peft.config import TunerConfig, check_positive, config_from_dict, register_tuner
from lightning_peft.layers import TRAINABLE_ATTR, OwnsHooks, like, mark, mark_state, unmark
from lightning_peft.layouts import find_hf_model, find_stacks
from lightning_peft.targeting import find_modules
from lightning_peft.tuners.kadapter_layers import KnowledgeAdapter, KnowledgeAdapterLayer

__all__ = [
    "KAdapterConfig",
    "KAdapterSet",
    "KnowledgeAdapter",
    "KnowledgeAdapterLayer",
    "add_kadapter",
    "kadapter_features",
    "kadapter_output",
    "kadapter_record",
    "list_kadapters",
    "restore_kadapters",
    "train_kadapter",
]

#: Name of the :class:`KAdapterSet` child added to the Hugging Face model.
SET_NAME = "kadapters"


class KAdapterSet(OwnsHooks, nn.Module):
    """The knowledge adapters of one model, and the hooks that feed them.

    Lives as child ``kadapters`` of the Hugging Face model. Forward hooks on the chosen blocks capture
    their hidden states; a forward hook on the model runs every knowledge adapter and (with
    ``concat_output``) concatenates their outputs to ``last_hidden_state``.
    """

    def __init__(self, model: nn.Module, blocks: list[str], width: int, *, concat_output: bool) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.configs: dict[str, KAdapterConfig] = {}
        self.width = width
        self.concat_output = concat_output
        self.disabled = False
        self.num_blocks = len(blocks)
        self._hidden: dict[int, Tensor] = {}
        self._padding_mask: Tensor | None = None
        self.features: dict[str, Tensor] = {}
        self.base_output: Tensor | None = None
        # Bound methods and partials of them (not closures): a deep copy of the model rebinds them to
        # the copied set, where a closure would keep feeding the original one.
        self.keep(model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for i, name in enumerate(blocks):
            self.keep(model.get_submodule(name).register_forward_hook(functools.partial(self._block_hook, i)))
        self.keep(model.register_forward_hook(self._post_hook))
        mark_state(self)  # frozen knowledge adapters are trained state too: checkpoints keep them

    def forward(self, hidden: dict[int, Tensor], padding_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Every knowledge adapter's output for captured base hidden states."""
        return {name: adapter(hidden, padding_mask) for name, adapter in self.adapters.items()}

    def _needed(self) -> set[int]:
        return {i for a in self.adapters.values() for i in a.reads}

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._hidden = {}
        self.features = {}
        self.base_output = None
        mask = kwargs.get("attention_mask")
        self._padding_mask = mask == 0 if isinstance(mask, Tensor) and mask.dim() == 2 else None
        if self._padding_mask is not None and not bool(self._padding_mask.any()):
            self._padding_mask = None

    def _block_hook(self, i: int, module: nn.Module, args: Any, output: Any) -> None:
        if self.disabled or i not in self._needed():
            return
        h = output[0] if isinstance(output, (tuple, list)) else output
        # Plug-ins outside the base: no gradient flows back into the base or between adapters.
        self._hidden[i] = h.detach()

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.disabled or not len(self.adapters):
            return None
        is_tuple = isinstance(output, tuple)
        last = output[0] if is_tuple else output.last_hidden_state
        self.base_output = last
        self.features = self(self._hidden, self._padding_mask)
        self._hidden = {}
        if not self.concat_output:
            return None
        joined = torch.cat([last, *self.features.values()], dim=-1)
        if is_tuple:
            return (joined, *output[1:])
        output.last_hidden_state = joined
        return output

    def remove_hooks(self) -> None:
        """Take every hook of this set off the model (:class:`~lightning_peft.layers.HookOwner`)."""
        super().remove_hooks()
        self._hidden, self.features, self.base_output = {}, {}, None


# -- finding the model and its blocks ----------------------------------------------------------------
def _blocks(model: nn.Module, config: KAdapterConfig) -> list[str]:
    if config.target_modules is not None:
        return find_modules(
            model, config.target_modules, exclude=config.exclude_modules, what="target_modules"
        )
    stacks = find_stacks(model, owner="KAdapterConfig")
    if len(stacks) != 1 or stacks[0].layout.shared_depth:
        raise ValueError(
            f"KAdapterConfig: {type(model).__name__} has {len(stacks)} block stacks"
            f"{' (one layer shared across depth)' if stacks and stacks[0].layout.shared_depth else ''}; "
            "K-Adapter reads the blocks of one stack: pass target_modules=[...] with the block module names"
        )
    return stacks[0].block_names()


def default_layers(depth: int) -> list[int]:
    """The paper's choice scaled to ``depth`` blocks: first, middle, last ({0, 11, 23} of 24)."""
    return sorted({0, max(0, depth // 2 - 1), depth - 1})


def _kset(root: nn.Module) -> KAdapterSet | None:
    return next((m for m in root.modules() if isinstance(m, KAdapterSet)), None)


def _require_kset(root: nn.Module) -> KAdapterSet:
    kset = _kset(root)
    if kset is None:
        raise ValueError("this model has no K-Adapter; inject(model, KAdapterConfig(...)) first")
    return kset


def add_kadapter(root: nn.Module, config: KAdapterConfig) -> list[str]:
    """Add knowledge adapter ``config.name`` to ``root`` and make it the only trainable one.

    The first call (what ``inject(model, KAdapterConfig(...))`` does) installs the hooks; later calls add
    more adapters, independent of the earlier ones, which are frozen. Returns the base blocks it reads.
    """
    prefix, model = find_hf_model(root, owner="KAdapterConfig")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            "KAdapterConfig supports encoder-only and decoder-only models; in an encoder-decoder the output "
            "is not aligned with the encoder blocks"
        )
    blocks = _blocks(model, config)
    kset = _kset(model)
    if kset is None:
        kset = KAdapterSet(model, blocks, int(model.config.hidden_size), concat_output=config.concat_output)
        model.add_module(SET_NAME, kset.train(model.training))
    elif config.name in kset.adapters:
        raise ValueError(f"a knowledge adapter named {config.name!r} already exists: {list(kset.adapters)}")
    elif config.concat_output != kset.concat_output:
        raise ValueError(
            f"KAdapterConfig.concat_output={config.concat_output} differs from the adapters already on the "
            f"model ({kset.concat_output})"
        )
    reads = config.adapter_layers if config.adapter_layers is not None else default_layers(len(blocks))
    bad = [i for i in reads if i >= len(blocks)]
    if bad:
        raise ValueError(
            f"KAdapterConfig.adapter_layers={reads}: the model has {len(blocks)} blocks "
            f"(0..{len(blocks) - 1})"
        )
    hidden = config.hidden or kset.width
    heads = config.num_heads or max(1, hidden // 64)
    if hidden % heads:
        raise ValueError(f"KAdapterConfig.hidden={hidden} is not divisible by num_heads={heads}")
    adapter = KnowledgeAdapter(
        kset.width,
        reads,
        hidden=hidden,
        num_layers=config.num_transformer_layers,
        heads=heads,
        ffn=config.ffn_size or 4 * hidden,
        dropout=config.dropout,
    )
    like(adapter, model)
    adapter.train(model.training)  # an eval model gets an eval adapter (no dropout)
    kset.adapters[config.name] = adapter
    kset.configs[config.name] = config
    train_kadapter(root, config.name)
    freeze_base(root)
    return [f"{prefix}.{blocks[i]}" if prefix else blocks[i] for i in reads]


def train_kadapter(root: nn.Module, name: str | None) -> None:
    """Make knowledge adapter ``name`` the only trainable one (``None``: freeze them all).

    ``modules_to_save`` (e.g. the task head) stay as they are; the base stays frozen.
    """
    kset = _require_kset(root)
    if name is not None and name not in kset.adapters:
        raise ValueError(f"unknown knowledge adapter {name!r}; this model has: {list(kset.adapters)}")
    for adapter_name, adapter in kset.adapters.items():
        if adapter_name == name:
            mark(adapter)
        else:
            unmark(adapter, state=False)
    freeze_base(root)


def kadapter_record(root: nn.Module) -> dict[str, Any] | None:
    """What rebuilds the knowledge adapters of ``root``: ``{"adapters": [config dicts, in concatenation
    order], "trainable": name or None}`` (``None`` without K-Adapters). JSON-safe, for checkpoint metadata."""
    kset = _kset(root)
    if kset is None or not len(kset.adapters):
        return None
    trainable = next((n for n, a in kset.adapters.items() if getattr(a, TRAINABLE_ATTR, None) is True), None)
    return {"adapters": [kset.configs[n].to_dict() for n in kset.adapters], "trainable": trainable}


def restore_kadapters(root: nn.Module, record: dict[str, Any]) -> list[str]:
    """Give ``root`` the knowledge adapters of ``record`` (from :func:`kadapter_record`): add those it
    lacks, in order, with fresh weights (load the saved ones afterwards), and make the recorded one the
    trainable one. Returns the names added.

    Raises:
        ValueError: the model's adapters are not a prefix of the recorded ones, or one has another config.
    """
    configs = [config_from_dict(d) for d in record["adapters"]]
    if not all(isinstance(c, KAdapterConfig) for c in configs):
        raise ValueError(f"not a K-Adapter record: {[d.get('method') for d in record['adapters']]}")
    names, existing = [c.name for c in configs], list_kadapters(root)
    if names[: len(existing)] != existing:
        raise ValueError(
            f"the recorded knowledge adapters {names} do not extend this model's {existing}: add them in "
            "the order they were trained"
        )
    kset = _kset(root)
    for config in configs[: len(existing)]:
        assert kset is not None
        diff = kset.configs[config.name].diff(config)
        if diff:
            raise ValueError(
                f"knowledge adapter {config.name!r} differs from the recorded one (model vs record):\n  "
                + "\n  ".join(diff)
            )
    added = [config.name for config in configs[len(existing) :]]
    for config in configs[len(existing) :]:
        add_kadapter(root, config)
    train_kadapter(root, record.get("trainable"))
    return added


def list_kadapters(root: nn.Module) -> list[str]:
    """Names of the knowledge adapters, in concatenation order."""
    kset = _kset(root)
    return list(kset.adapters) if kset is not None else []


def kadapter_features(root: nn.Module) -> dict[str, Tensor]:
    """``{name: (B, T, H)}``: each knowledge adapter's output in the last forward of ``root``."""
    kset = _require_kset(root)
    if not kset.features:
        raise ValueError("no K-Adapter features yet: run a forward of the model first (adapters enabled)")
    return dict(kset.features)


def kadapter_output(root: nn.Module) -> Tensor:
    """``concat([base last hidden state, *adapter outputs], -1)`` of the last forward: (B, T, H * (1 + k))."""
    kset = _require_kset(root)
    features = kadapter_features(root)
    assert kset.base_output is not None
    return torch.cat([kset.base_output, *features.values()], dim=-1)


@register_tuner("kadapter")
@dataclass(kw_only=True)
class KAdapterConfig(TunerConfig):
    """One knowledge adapter of K-Adapter.

    Attributes:
        name: the adapter's name (its place in the concatenation is the order adapters were added).
        adapter_layers: base blocks read by the adapter layers, one adapter layer each (default: first,
            middle, last: [0, 5, 11] on 12 blocks, the paper's [0, 11, 23] on 24).
        hidden: width inside the adapter (down projection size; default the model width; paper: 768).
        num_transformer_layers: ``nn.TransformerEncoderLayer`` per adapter layer (paper: 2).
        num_heads: attention heads (default ``hidden // 64``, at least 1).
        ffn_size: feed-forward width of those layers (default ``4 * hidden``).
        dropout: dropout inside the adapter layers.
        concat_output: replace the model's ``last_hidden_state`` by the concatenation for the head.

    ``target_modules`` may name the base blocks (for models outside the Hugging Face layouts); ``layers``
    is refused (use ``adapter_layers``).
    """

    #: The model output gains the adapters' channels: not the base output, even untrained.
    identity_at_init: ClassVar[bool] = False

    name: str = "kadapter"
    adapter_layers: list[int] | None = None
    hidden: int | None = None
    num_transformer_layers: int = 2
    num_heads: int | None = None
    ffn_size: int | None = None
    dropout: float = 0.1
    concat_output: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layers is not None:
            raise ValueError("KAdapterConfig: give adapter_layers (the base blocks to read), not layers")
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"KAdapterConfig.name={self.name!r} must be an identifier")
        if self.adapter_layers is not None:
            if not self.adapter_layers or any(
                not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in self.adapter_layers
            ):
                raise ValueError(
                    "KAdapterConfig.adapter_layers must be non-empty block indices >= 0, "
                    f"got {self.adapter_layers}"
                )
            self.adapter_layers = list(self.adapter_layers)
        for field_name in ("hidden", "num_heads", "ffn_size"):
            value = getattr(self, field_name)
            if value is not None:
                check_positive("KAdapterConfig", field_name, value)
        check_positive("KAdapterConfig", "num_transformer_layers", self.num_transformer_layers)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"KAdapterConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def apply(self, model: nn.Module) -> list[str]:
        if _kset(model) is not None:
            raise ValueError("this model already has K-Adapters: add more with add_kadapter(model, config)")
        return add_kadapter(model, self)

    # -- the optional tuner protocol: adapters added after injection travel in checkpoint metadata ------
    def checkpoint_record(self, model: nn.Module) -> dict[str, Any] | None:
        return kadapter_record(model)

    def restore_record(self, model: nn.Module, record: dict[str, Any]) -> None:
        restore_kadapters(model, record)
