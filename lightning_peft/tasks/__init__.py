"""Tasks the CLI and examples train: a text classifier and a causal-LM fine-tune, with their data modules."""

from lightning_peft.tasks.causal_lm import CausalLM
from lightning_peft.tasks.data import PadCollator, TextClassificationData
from lightning_peft.tasks.multitask_prompt import MultiTaskPromptData, MultiTaskPromptLM
from lightning_peft.tasks.pretrained import HashTokenizer, resolve_pretrained_path
from lightning_peft.tasks.prompt_classifier import PromptClassifier
from lightning_peft.tasks.prompt_data import PromptData
from lightning_peft.tasks.sft_data import SFTData
from lightning_peft.tasks.text_classification import TextClassifier

__all__ = [
    "CausalLM",
    "HashTokenizer",
    "MultiTaskPromptData",
    "MultiTaskPromptLM",
    "PadCollator",
    "PromptClassifier",
    "PromptData",
    "SFTData",
    "TextClassificationData",
    "TextClassifier",
    "resolve_pretrained_path",
]
