"""Early exit: a classifier after every transformer block, so easy inputs leave the encoder early.

Methods, each named as in its paper:

* ``criterion="patience"``: PABEE (Zhou et al. 2020, "BERT Loses Patience: Fast and Robust Inference with
  Early Exit"). A counter goes up by one when an exit's prediction equals the previous exit's and back to
  zero otherwise; a sample leaves when it reaches ``patience``. Regression (``num_labels=1``): two
  predictions agree when ``|y_i - y_{i-1}| < tau``. ``patience=0`` runs the full model, as in PABEE.
* ``criterion="entropy"``: DeeBERT (Xin et al. 2020, "DeeBERT: Dynamic Early Exiting for Accelerating BERT
  Inference"). Exit at the first layer whose prediction entropy is below ``threshold`` (one value, or one
  per layer), computed from ``log_softmax`` (finite for any logits).
* ``criterion="confidence"``: Shallow-Deep Networks (Kaya et al. 2019, "Shallow-Deep Networks:
  Understanding and Mitigating Network Overthinking"). Exit when the max softmax probability is
  ``>= threshold``; when no exit fires, SDN returns the most confident exit (``fallback="most_confident"``)
  or the last one (``fallback="last"``).
* ``criterion="fixed"``: every sample leaves after ``exit_layer`` blocks.

Training: every exit's loss, weighted (``loss_weights``): PABEE's ``sum_j j * L_j / sum_j j``
(``"pabee"``), equal weights, or your own (normalised by their sum). ``training="deebert"`` is DeeBERT's
two-stage schedule in one run: until global step ``stage2_step`` the final exit and the other tuners train
on the final exit's loss (stage 1); from then on only the other exit heads train, on the sum of their
losses, with the encoder run without gradients and the final head out of the loss (stage 2). Two Lightning
runs are the same schedule split in two: run 1 stops at ``stage2_step``, run 2 resumes its checkpoint.

The heads (:class:`ExitHeads`) live on the Hugging Face model as ``exit_heads`` and are trainable tuner
state: adapter-only checkpoints hold them with the other tuners'. Stack with other tuners through
``lightning_peft.inject(model, [LoRAConfig(...), EarlyExitConfig(...)])``, exits last (a tuner injected after
them with ``target_modules="all-linear"`` would wrap the heads' layers too). Inference and the loss live in
:mod:`lightning_peft.early_exit` (``exit_logits``, ``predict``, ``training_loss``).

Example::

    import lightning_peft as lp
    from lightning_peft.early_exit import predict

    lp.inject(bert, lp.EarlyExitConfig(num_labels=3, criterion="patience", patience=2))
    logits, exit_layer = predict(bert, input_ids=ids, attention_mask=mask)   # (B, 3), (B,)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_peft.config import TunerConfig, check_choice, check_positive, register_tuner
from lightning_peft.layers import mark

__all__ = ["CRITERIA", "HEADS_ATTR", "EarlyExitConfig", "ExitHead", "ExitHeads", "find_exit_heads"]

CRITERIA = ("patience", "entropy", "confidence", "fixed")
HEADS_ATTR = "exit_heads"
_OWNER = "EarlyExitConfig"


@register_tuner("early_exit")
@dataclass(kw_only=True)
class EarlyExitConfig(TunerConfig):
    """Exit heads after every block and the rule that decides where each sample leaves.

    Attributes:
        num_labels: classes of the task (1: regression, trained with MSE).
        criterion: ``"patience"`` (PABEE), ``"entropy"`` (DeeBERT), ``"confidence"`` (Shallow-Deep) or
            ``"fixed"``.
        patience: PABEE's patience (``0``: full model); at most ``num_layers - 1``.
        threshold: entropy threshold in ``[0, ln(num_labels)]`` (a float or one per layer), or confidence
            threshold in ``[1/num_labels, 1]``.
        tau: regression agreement tolerance of PABEE (``|y_i - y_{i-1}| < tau``).
        exit_layer: the layer (1-based) every sample leaves at with ``criterion="fixed"``.
        fallback: with ``"confidence"``, what a sample that never fires returns: the most confident exit
            (SDN) or the last one.
        pooling: how an exit reads the block output: the first token (``"cls"``) or the mask-aware mean.
        head_pooler: put a ``tanh(Linear(H, H))`` pooler in front of every exit's classifier (DeeBERT's
            highway, BERT's pooler).
        dropout: dropout before every exit's classifier.
        loss_weights: ``"pabee"``, ``"equal"`` or one positive weight per exit.
        training: ``"joint"`` (all exits and the other tuners train on the weighted loss) or ``"deebert"``
            (two stages, switching at ``stage2_step``).
        stage2_step: global step at which DeeBERT's stage 2 starts.
    """

    identity_at_init: ClassVar[bool] = True  # the encoder's outputs are untouched; heads are added beside

    num_labels: int = 2
    criterion: str = "patience"
    patience: int = 1
    threshold: float | list[float] | None = None
    tau: float | None = None
    exit_layer: int | None = None
    fallback: str = "most_confident"
    pooling: str = "cls"
    head_pooler: bool = True
    dropout: float = 0.1
    loss_weights: str | list[float] = "pabee"
    training: str = "joint"
    stage2_step: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "layers"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{_OWNER}.{name} has no meaning: an exit head goes after every block of the encoder; "
                    "give target_modules to the tuner stacked with it (e.g. LoRAConfig)"
                )
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ValueError(
                f"{_OWNER}.num_labels must be an int >= 1 (1 = regression), got {self.num_labels!r}"
            )
        check_choice(_OWNER, "criterion", self.criterion, CRITERIA)
        check_choice(_OWNER, "fallback", self.fallback, ("most_confident", "last"))
        check_choice(_OWNER, "pooling", self.pooling, ("cls", "mean"))
        check_choice(_OWNER, "training", self.training, ("joint", "deebert"))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{_OWNER}.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"{_OWNER}.patience must be an int >= 0 (0 = full model), got {self.patience!r}")
        self._check_criterion()
        self._check_training()

    def _check_criterion(self) -> None:
        regression = self.num_labels == 1
        if regression and self.criterion in ("entropy", "confidence"):
            raise ValueError(
                f"{_OWNER}(criterion={self.criterion!r}) needs class probabilities, but num_labels=1 is "
                "regression; use criterion='patience' with tau, or 'fixed'"
            )
        if self.criterion == "patience" and regression:
            if self.tau is None:
                raise ValueError(
                    f"{_OWNER}: regression with criterion='patience' needs tau (agreement tolerance)"
                )
            check_positive(_OWNER, "tau", self.tau)
        if self.criterion in ("entropy", "confidence"):
            self._check_threshold()
        elif self.threshold is not None:
            raise ValueError(
                f"{_OWNER}.threshold is used by 'entropy' and 'confidence', not {self.criterion!r}"
            )
        if self.criterion == "fixed":
            if (
                not isinstance(self.exit_layer, int)
                or isinstance(self.exit_layer, bool)
                or self.exit_layer < 1
            ):
                raise ValueError(
                    f"{_OWNER}(criterion='fixed') needs exit_layer >= 1, got {self.exit_layer!r}"
                )
        elif self.exit_layer is not None:
            raise ValueError(f"{_OWNER}.exit_layer is only used by criterion='fixed', not {self.criterion!r}")

    def _check_threshold(self) -> None:
        if self.threshold is None:
            raise ValueError(f"{_OWNER}(criterion={self.criterion!r}) needs a threshold")
        if self.criterion == "entropy":
            low, high, what = 0.0, math.log(self.num_labels), "ln(num_labels)"
        else:
            if isinstance(self.threshold, (list, tuple)):
                raise ValueError(
                    f"{_OWNER}: per-layer thresholds are for 'entropy'; 'confidence' takes one float"
                )
            low, high, what = 1.0 / self.num_labels, 1.0, "1"
        values = list(self.threshold) if isinstance(self.threshold, (list, tuple)) else [self.threshold]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
                raise ValueError(
                    f"{_OWNER}.threshold={v!r} is outside the range of {self.criterion} with "
                    f"{self.num_labels} labels: [{low:.4g}, {high:.4g}] ({what}). A negative entropy "
                    "threshold would silently disable every exit; above the maximum every sample leaves "
                    "first."
                )
        self.threshold = (
            [float(v) for v in values] if isinstance(self.threshold, (list, tuple)) else float(values[0])
        )

    def _check_training(self) -> None:
        if isinstance(self.loss_weights, str):
            check_choice(_OWNER, "loss_weights", self.loss_weights, ("pabee", "equal"))
        else:
            weights = list(self.loss_weights)
            if not weights or any(
                isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights
            ):
                raise ValueError(f"{_OWNER}.loss_weights must be 'pabee', 'equal' or non-negative numbers")
            if sum(weights) <= 0:
                raise ValueError(f"{_OWNER}.loss_weights sum to 0: no exit would train")
            self.loss_weights = [float(w) for w in weights]
        if self.training == "deebert":
            if (
                not isinstance(self.stage2_step, int)
                or isinstance(self.stage2_step, bool)
                or self.stage2_step < 0
            ):
                raise ValueError(
                    f"{_OWNER}(training='deebert') needs stage2_step >= 0 (the global step of stage 2)"
                )
        elif self.stage2_step is not None:
            raise ValueError(f"{_OWNER}.stage2_step is only used with training='deebert'")

    def check_depth(self, num_layers: int) -> None:
        """Validate the fields that depend on the number of exits ``num_layers`` (raises ValueError)."""
        if self.criterion == "patience" and self.patience > num_layers - 1:
            raise ValueError(
                f"{_OWNER}.patience={self.patience} can never be reached with {num_layers} layers (the "
                "counter "
                f"is at most {num_layers - 1}); use patience <= {num_layers - 1}, or 0 for the full model"
            )
        if self.criterion == "fixed" and self.exit_layer is not None and self.exit_layer > num_layers:
            raise ValueError(f"{_OWNER}.exit_layer={self.exit_layer} but the model has {num_layers} layers")
        if isinstance(self.threshold, list) and len(self.threshold) not in (num_layers - 1, num_layers):
            raise ValueError(
                f"{_OWNER}.threshold has {len(self.threshold)} values; give one per layer ({num_layers}) or "
                "one "
                f"per non-final layer ({num_layers - 1}), or a single float"
            )
        if isinstance(self.loss_weights, list) and len(self.loss_weights) != num_layers:
            raise ValueError(
                f"{_OWNER}.loss_weights has {len(self.loss_weights)} values for {num_layers} exits"
            )

    def layer_thresholds(self, num_layers: int) -> list[float]:
        """The threshold of every exit (a float repeated, or the per-layer list padded for the last)."""
        assert self.threshold is not None
        if isinstance(self.threshold, list):
            return self.threshold + self.threshold[-1:] * (num_layers - len(self.threshold))
        return [float(self.threshold)] * num_layers

    def apply(self, model: nn.Module) -> list[str]:
        from lightning_peft.early_exit.stepping import resolve_encoder

        enc = resolve_encoder(model)
        self.check_depth(enc.num_layers)
        if isinstance(getattr(enc.hf, HEADS_ATTR, None), ExitHeads):
            raise ValueError(
                "this model already has exit heads; unload() it before injecting EarlyExitConfig again"
            )
        heads = ExitHeads(self, int(enc.hf.config.hidden_size), enc.num_layers)
        ref = next(enc.blocks[0].parameters(), None)
        if ref is not None:  # the encoder's device and dtype (meta too: materialised with the model)
            heads.to(device=ref.device, dtype=ref.dtype)
        heads.train(enc.hf.training)  # an encoder in eval mode gets heads without dropout
        enc.hf.add_module(HEADS_ATTR, heads)
        mark(heads)
        return [f"{enc.hf_name}.{HEADS_ATTR}" if enc.hf_name else HEADS_ATTR]


class ExitHead(nn.Module):
    """One exit: pool ``(B, T, H)`` -> optional ``tanh(Linear)`` pooler -> dropout -> ``Linear(H, C)``."""

    def __init__(self, hidden: int, num_labels: int, *, pooling: str, pooler: bool, dropout: float) -> None:
        super().__init__()
        self.pooling = pooling
        self.pooler = nn.Linear(hidden, hidden) if pooler else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B, T, H)`` block output and ``(B, T)`` mask -> ``(B, C)`` logits."""
        if self.pooling == "cls":
            x = hidden[:, 0]  # (B, H)
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            x = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, H)
        if self.pooler is not None:
            x = torch.tanh(self.pooler(x))
        return self.classifier(self.dropout(x))


class ExitHeads(nn.ModuleList):
    """The exit heads of one model (``heads[i]`` reads block ``i``'s output) and their config.

    A tuner module outside the base layers: :func:`lightning_peft.unload` deletes it (``merge_weights=False``;
    heads cannot be folded into base weights).
    """

    def __init__(self, config: EarlyExitConfig, hidden: int, num_layers: int) -> None:
        super().__init__(
            ExitHead(
                hidden,
                config.num_labels,
                pooling=config.pooling,
                pooler=config.head_pooler,
                dropout=config.dropout,
            )
            for _ in range(num_layers)
        )
        self.config = config
        self.disabled = False

    def __getitem__(self, idx: int | slice) -> Any:  # a slice is a plain list of heads
        if isinstance(idx, slice):
            return list(self._modules.values())[idx]
        return super().__getitem__(idx)

    def remove_hooks(self) -> None:
        """Nothing to remove: the heads act through :mod:`lightning_peft.early_exit`, not hooks."""

    def extra_repr(self) -> str:
        return f"criterion={self.config.criterion!r}, num_labels={self.config.num_labels}"


def find_exit_heads(model: nn.Module) -> ExitHeads:
    """The :class:`ExitHeads` inside ``model``; a clear error when there are none."""
    found = [m for m in model.modules() if isinstance(m, ExitHeads)]
    if not found:
        raise ValueError(
            "this model has no exit heads: inject them first with lightning_peft.inject(model, "
            "EarlyExitConfig(num_labels=...)) (or a list [LoRAConfig(...), EarlyExitConfig(...)])"
        )
    if len(found) > 1:
        raise ValueError(
            f"this model holds {len(found)} sets of exit heads; call early-exit functions on one encoder"
        )
    return found[0]
