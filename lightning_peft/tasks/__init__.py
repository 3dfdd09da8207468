"""Tasks the CLI and examples train: a generic text classifier, its data module and the bundled demo data."""

from lightning_peft.tasks.data import PadCollator, TextClassificationData
from lightning_peft.tasks.multitask_prompt import MultiTaskPromptData, MultiTaskPromptLM
from lightning_peft.tasks.pretrained import HashTokenizer, resolve_pretrained_path
from lightning_peft.tasks.prompt_classifier import PromptClassifier
from lightning_peft.tasks.prompt_data import PromptData
from lightning_peft.tasks.text_classification import TextClassifier

__all__ = [
    "HashTokenizer",
    "MultiTaskPromptData",
    "MultiTaskPromptLM",
    "PadCollator",
    "PromptClassifier",
    "PromptData",
    "TextClassificationData",
    "TextClassifier",
    "resolve_pretrained_path",
]
