"""Tasks the CLI and examples train: a generic text classifier, its data module, the bundled demo data, and
the recipes' `LastCheckpoint` (last.ckpt every N steps and at the end of fit)."""

from lightning_peft.tasks.data import PadCollator, TextClassificationData
from lightning_peft.tasks.last_checkpoint import LastCheckpoint
from lightning_peft.tasks.pretrained import HashTokenizer, resolve_pretrained_path
from lightning_peft.tasks.text_classification import TextClassifier

__all__ = [
    "HashTokenizer",
    "LastCheckpoint",
    "PadCollator",
    "TextClassificationData",
    "TextClassifier",
    "resolve_pretrained_path",
]
