"""Tasks the CLI and examples train: a text classifier (with optional early exits), a causal-LM
fine-tune, prompt-based classifiers, their data modules, and the recipes' `LastCheckpoint` (last.ckpt
every N steps and at the end of fit)."""

from lightning_peft.tasks.causal_lm import CausalLM
from lightning_peft.tasks.data import PadCollator, TextClassificationData
from lightning_peft.tasks.last_checkpoint import LastCheckpoint
from lightning_peft.tasks.multitask_prompt import MultiTaskPromptData, MultiTaskPromptLM
from lightning_peft.tasks.pretrained import HashTokenizer, resolve_pretrained_path
from lightning_peft.tasks.prompt_classifier import PromptClassifier
from lightning_peft.tasks.prompt_data import PromptData
from lightning_peft.tasks.sft_data import SFTData
from lightning_peft.tasks.text_classification import TextClassifier

__all__ = [
    "CausalLM",
    "HashTokenizer",
    "LastCheckpoint",
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
