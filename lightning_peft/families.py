"""Where things sit inside a transformer block, per Hugging Face model family.

Bottleneck adapters go after the attention output projection and after the FFN output projection
(Houlsby et al. 2019), Pfeiffer adapters after the FFN only (Pfeiffer et al. 2020); BitFit needs to know
which biases belong to attention. Rather than special-casing each tuner, one small table names those
parts as full-match regular expressions over module names (a leading ``<anything>.`` is allowed, so the
same table works for a bare ``BertModel`` and for a LightningModule holding it as ``backbone``).

Models outside the table are supported by passing module names/regexes to the tuner config directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["FAMILIES", "BlockParts", "detect_family", "part_regex"]


@dataclass(frozen=True)
class BlockParts:
    """Regexes (relative to the model root) of the parts of every transformer block."""

    attention_output: str
    ffn_output: str
    attention_norm: str
    ffn_norm: str
    attention: str  # every projection of self-attention (q, k, v, o)
    ffn: str  # every projection of the feed-forward sub-layer


_BERT = BlockParts(
    attention_output=r"encoder\.layer\.\d+\.attention\.output\.dense",
    ffn_output=r"encoder\.layer\.\d+\.output\.dense",
    attention_norm=r"encoder\.layer\.\d+\.attention\.output\.LayerNorm",
    ffn_norm=r"encoder\.layer\.\d+\.output\.LayerNorm",
    attention=r"encoder\.layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
    ffn=r"encoder\.layer\.\d+\.(intermediate|output)\.dense",
)
_DISTILBERT = BlockParts(
    attention_output=r"transformer\.layer\.\d+\.attention\.out_lin",
    ffn_output=r"transformer\.layer\.\d+\.ffn\.lin2",
    attention_norm=r"transformer\.layer\.\d+\.sa_layer_norm",
    ffn_norm=r"transformer\.layer\.\d+\.output_layer_norm",
    attention=r"transformer\.layer\.\d+\.attention\.(q|k|v|out)_lin",
    ffn=r"transformer\.layer\.\d+\.ffn\.lin[12]",
)
_GPT2 = BlockParts(
    attention_output=r"h\.\d+\.attn\.c_proj",
    ffn_output=r"h\.\d+\.mlp\.c_proj",
    attention_norm=r"h\.\d+\.ln_1",
    ffn_norm=r"h\.\d+\.ln_2",
    attention=r"h\.\d+\.attn\.c_(attn|proj)",
    ffn=r"h\.\d+\.mlp\.c_(fc|proj)",
)
_LLAMA = BlockParts(
    attention_output=r"layers\.\d+\.self_attn\.o_proj",
    ffn_output=r"layers\.\d+\.mlp\.down_proj",
    attention_norm=r"layers\.\d+\.input_layernorm",
    ffn_norm=r"layers\.\d+\.post_attention_layernorm",
    attention=r"layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    ffn=r"layers\.\d+\.mlp\.(gate|up|down)_proj",
)
_T5 = BlockParts(
    attention_output=r"(encoder|decoder)\.block\.\d+\.layer\.0\.SelfAttention\.o",
    ffn_output=r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.DenseReluDense\.wo",
    attention_norm=r"(encoder|decoder)\.block\.\d+\.layer\.0\.layer_norm",
    ffn_norm=r"(encoder\.block\.\d+\.layer\.1|decoder\.block\.\d+\.layer\.2)\.layer_norm",
    attention=r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.[qkvo]",
    ffn=r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.DenseReluDense\.(wi(_0|_1)?|wo)",
)

#: ``config.model_type`` -> block parts. Families sharing a layout share an entry.
FAMILIES: dict[str, BlockParts] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "camembert": _BERT,
    "electra": _BERT,
    "distilbert": _DISTILBERT,
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "t5": _T5,
    "mt5": _T5,
}


def detect_family(model: nn.Module) -> str | None:
    """``config.model_type`` of the first Hugging Face model found in ``model`` (itself or a child)."""
    for module in model.modules():
        config = getattr(module, "config", None)
        model_type = getattr(config, "model_type", None)
        if isinstance(model_type, str):
            return model_type
    return None


def part_regex(model: nn.Module, part: str, *, owner: str) -> str:
    """The full-match regex of block part ``part`` for ``model``'s family.

    Raises a ValueError naming the supported families and the way out (explicit ``target_modules``)
    when the family is unknown.
    """
    family = detect_family(model)
    if family not in FAMILIES:
        found = f"model family {family!r}" if family else "a model that is not a Hugging Face transformer"
        raise ValueError(
            f"{owner}: cannot place {part!r} automatically in {found}. Known families: "
            f"{', '.join(sorted(FAMILIES))}. Pass target_modules=[...] with the module names instead."
        )
    return r"(?:.*\.)?" + getattr(FAMILIES[family], part)
