"""Lightning callbacks (installed as ``lightning_peft.callbacks``)."""

from lightning_peft.callbacks.adapter_checkpoint import AdapterCheckpointError
from lightning_peft.callbacks.attention_swap import AttentionSwap
from lightning_peft.callbacks.peft import PEFT

__all__ = ["PEFT", "AdapterCheckpointError", "AttentionSwap"]
