"""All-exit logits and per-sample dynamic exits that save time inside a batch.

:func:`predict` decides after every block which samples leave (:class:`~lightning_peft.early_exit.criteria.
ExitRule`), writes their logits into the output, keeps the others with ``index_select``, drops the trailing
padding columns no survivor needs, rebuilds the attention mask for the smaller batch and runs the next
block on the survivors only. Every anchor implementation (DeeBERT, PABEE, the transformers research
projects) runs batch size 1 or waits for the slowest sample of the batch; here a batch gets cheaper with
every layer as samples leave.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

try:  # transformers >= 5 builds every attention implementation's mask through one function
    from transformers.masking_utils import create_bidirectional_mask
except ImportError:  # transformers 4.57: encoders build their masks inline
    create_bidirectional_mask = None

from lightning_peft.early_exit.criteria import ExitRule
from lightning_peft.early_exit.stepping import Encoder, block_output, resolve_encoder, run_pre_hooks
from lightning_peft.tuners.early_exit import EarlyExitConfig, ExitHeads, find_exit_heads

__all__ = ["exit_logits", "hidden_states", "predict"]

_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


@dataclass
class _State:
    """The running part of a batch: ``hidden (b, T, H)``, ``mask (b, T)`` and the 4-D mask built from it."""

    hidden: Tensor
    mask: Tensor
    attn: Any

    def select(self, keep: Tensor, enc: Encoder) -> _State:
        hidden, mask = self.hidden.index_select(0, keep), self.mask.index_select(0, keep)
        used = mask.any(0).nonzero()
        end = int(used.max()) + 1 if used.numel() else 1
        hidden, mask = hidden[:, :end], mask[:, :end]  # trailing padding no survivor needs
        return _State(hidden, mask, _attention_mask(enc, hidden, mask))


def _attention_mask(enc: Encoder, hidden: Tensor, mask: Tensor) -> Any:
    if create_bidirectional_mask is None:
        raise RuntimeError(
            "early exit steps the encoder's blocks itself and builds their attention mask with "
            "transformers.masking_utils.create_bidirectional_mask, which this transformers lacks: install "
            "transformers >= 5"
        )
    return create_bidirectional_mask(config=enc.hf.config, inputs_embeds=hidden, attention_mask=mask)


def _inputs(enc: Encoder, batch: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(k for k in batch if k not in (*_INPUTS, "labels"))
    if unknown:
        raise TypeError(f"unexpected input(s) {unknown}; early exit takes {', '.join(_INPUTS)} (and labels)")
    kwargs = {k: v for k, v in batch.items() if k in _INPUTS and v is not None}
    return run_pre_hooks(enc.hf, kwargs)


def _embed(enc: Encoder, batch: dict[str, Any]) -> _State:
    inputs = _inputs(enc, batch)
    hidden = enc.embed(enc.embeddings, inputs)  # (B, T, H)
    if enc.projection is not None:
        hidden = enc.projection(hidden)
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    elif mask.shape[1] < hidden.shape[1]:  # virtual tokens prepended without extending the mask
        mask = torch.cat([mask.new_ones(mask.shape[0], hidden.shape[1] - mask.shape[1]), mask], 1)
    return _State(hidden, mask, _attention_mask(enc, hidden, mask))


def _block(block: nn.Module, state: _State) -> _State:
    return _State(block_output(block(state.hidden, state.attn)), state.mask, state.attn)


def hidden_states(model: nn.Module, **batch: Any) -> tuple[list[Tensor], Tensor]:
    """Every block's output ``[(B, T, H)] * L`` and the ``(B, T)`` padding mask the exits pool with."""
    enc = resolve_encoder(model)
    state = _embed(enc, batch)
    outs = []
    for block in enc.blocks:
        state = _block(block, state)
        outs.append(state.hidden)
    return outs, state.mask


def exit_logits(model: nn.Module, **batch: Any) -> Tensor:
    """Every exit's logits ``(L, B, C)`` with all layers run (training, analysis, :func:`decide`).

    Args:
        model: a model holding a Hugging Face encoder with exit heads
            (``inject(model, EarlyExitConfig(...))``).
        **batch: ``input_ids``, ``attention_mask``, ``token_type_ids``, ... as the model takes them
            (``labels`` is ignored).
    """
    heads = find_exit_heads(model)
    hidden, mask = hidden_states(model, **batch)
    return torch.stack([head(h, mask) for head, h in zip(heads, hidden, strict=True)])


@torch.no_grad()
def predict(model: nn.Module, config: EarlyExitConfig | None = None, **batch: Any) -> tuple[Tensor, Tensor]:
    """Per-sample early exit: every sample leaves the encoder at its own layer.

    After each block the rule decides who leaves; their logits are scattered into the output and the
    survivors (``index_select``, trailing padding trimmed) run on. Equal, sample by sample, to running
    each sample alone, and to :func:`lightning_peft.early_exit.decide` on :func:`exit_logits`.

    Args:
        model: a model holding a Hugging Face encoder with exit heads.
        config: the rule to use instead of the one injected (e.g. another threshold); same heads.
        **batch: the model inputs (``labels`` is ignored).

    Returns:
        ``(logits (B, C), exit_layer (B,))``; ``exit_layer`` counts the blocks the sample ran (1..L).
    """
    heads = find_exit_heads(model)
    enc = resolve_encoder(model)
    cfg = _rule_config(heads, config, enc.num_layers)
    state = _embed(enc, batch)
    B, L = state.hidden.shape[0], enc.num_layers
    out = state.hidden.new_zeros(B, cfg.num_labels)
    exit_layer = torch.full((B,), L, dtype=torch.long, device=out.device)
    alive = torch.arange(B, device=out.device)
    rule = ExitRule(cfg, L, B, out.device)
    for i, block in enumerate(enc.blocks):
        state = _block(block, state)
        if not rule.needs_head(i):
            continue
        leave, chosen = rule.step(heads[i](state.hidden, state.mask), i)  # (b,), (b, C)
        if not bool(leave.any()):
            continue
        out[alive[leave]] = chosen[leave].to(out.dtype)
        exit_layer[alive[leave]] = i + 1
        keep = (~leave).nonzero(as_tuple=True)[0]
        if keep.numel() == 0:
            break
        alive = alive.index_select(0, keep)
        rule.select(keep)
        state = state.select(keep, enc)
    return out, exit_layer


def _rule_config(heads: ExitHeads, config: EarlyExitConfig | None, num_layers: int) -> EarlyExitConfig:
    cfg = heads.config if config is None else config
    if cfg.num_labels != heads.config.num_labels:
        raise ValueError(
            f"config.num_labels={cfg.num_labels} but the exit heads predict {heads.config.num_labels} labels"
        )
    cfg.check_depth(num_layers)
    return cfg
