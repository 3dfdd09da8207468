"""Early exit at inference and multi-exit training (PABEE, DeeBERT, Shallow-Deep): the functions.

The heads and the rule are a tuner, :class:`lightning_peft.EarlyExitConfig`
(:mod:`lightning_peft.tuners.early_exit`); this package runs them:

* :func:`exit_logits` ``(model, **batch) -> (L, B, C)``: every exit, all layers run;
* :func:`predict` ``(model, **batch) -> (logits (B, C), exit_layer (B,))``: each sample leaves at its own
  layer, and the ones that left are removed from the batch;
* :func:`decide`: the same rule applied to precomputed ``(L, B, C)`` logits;
* :func:`training_loss`, :func:`exit_weights`, :func:`exit_losses`: PABEE's weighted joint loss and
  DeeBERT's two stages.
"""

from lightning_peft.early_exit.criteria import ExitRule, decide, entropy
from lightning_peft.early_exit.engine import exit_logits, hidden_states, predict
from lightning_peft.early_exit.losses import deebert_stage, exit_losses, exit_weights, training_loss
from lightning_peft.early_exit.stepping import register_family, resolve_encoder

__all__ = [
    "ExitRule",
    "decide",
    "deebert_stage",
    "entropy",
    "exit_logits",
    "exit_losses",
    "exit_weights",
    "hidden_states",
    "predict",
    "register_family",
    "resolve_encoder",
    "training_loss",
]
