"""Prompt-based fine-tuning: patterns and verbalizers (PET), ensembles and iPET, LM-BFF demonstrations and
label-word search, multi-task templates with rank classification.

Example::

    from lightning_peft.prompting import PromptScorer, Template, Verbalizer

    template = Template("{text} It was {mask}.")
    verbalizer = Verbalizer({"negative": ["terrible"], "positive": ["great", "good"]})
    scorer = PromptScorer(template, verbalizer, tokenizer, kind="masked")
"""

from lightning_peft.prompting.scoring import PromptScorer, lm_logits
from lightning_peft.prompting.soft import SoftTokens
from lightning_peft.prompting.template import Encoding, Template
from lightning_peft.prompting.tokens import lm_kind
from lightning_peft.prompting.verbalizer import AGGREGATIONS, LabelWords, Verbalizer, aggregate

__all__ = [
    "AGGREGATIONS",
    "Encoding",
    "LabelWords",
    "PromptScorer",
    "SoftTokens",
    "Template",
    "Verbalizer",
    "aggregate",
    "lm_kind",
    "lm_logits",
]
