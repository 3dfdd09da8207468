"""The built-in model layouts: BERT-style encoders, DistilBERT, ALBERT, GPT-2, Llama-style decoders, T5
and BART, registered on import of :mod:`lightning_peft.layouts`. A family that differs from one of them in
a name or two is a :func:`~lightning_peft.layouts.register_layout` call with a
:func:`~lightning_peft.layouts.with_block` copy.
"""

from __future__ import annotations

from lightning_peft.layouts.base import BlockLayout, ModelLayout, StackLayout, register_layout


def _bert_like(prefix: str) -> BlockLayout:
    return BlockLayout(
        attention="attention.self",
        attention_classes=(f"{prefix}SelfAttention", f"{prefix}SdpaSelfAttention"),
        query="query",
        key="key",
        value="value",
        attention_output="attention.output.dense",
        attention_norm="attention.output.LayerNorm",
        ffn_input="intermediate.dense",
        ffn_output="output.dense",
        ffn_norm="output.LayerNorm",
    )


def _encoder(block: BlockLayout, path: str = "encoder.layer", **kw: object) -> tuple[StackLayout, ...]:
    return (StackLayout(role="encoder", path=path, block=block, **kw),)  # type: ignore[arg-type]


for _family, _prefix in (
    ("bert", "Bert"),
    ("roberta", "Roberta"),
    ("xlm-roberta", "XLMRoberta"),
    ("camembert", "Camembert"),
    ("electra", "Electra"),
):
    register_layout(
        _family,
        ModelLayout(
            family=_family,
            stacks=_encoder(_bert_like(_prefix)),
            embeddings="embeddings",
            lora_targets=("query", "value"),
        ),
    )

register_layout(
    "distilbert",
    ModelLayout(
        family="distilbert",
        stacks=_encoder(
            BlockLayout(
                attention="attention",
                attention_classes=(
                    "DistilBertSelfAttention",
                    "MultiHeadSelfAttention",
                    "DistilBertSdpaAttention",
                ),
                query="q_lin",
                key="k_lin",
                value="v_lin",
                attention_output="attention.out_lin",
                attention_norm="sa_layer_norm",
                ffn_input="ffn.lin1",
                ffn_output="ffn.lin2",
                ffn_norm="output_layer_norm",
            ),
            path="transformer.layer",
            causal=False,
        ),
        embeddings="embeddings",
        lora_targets=("q_lin", "v_lin"),
    ),
)

register_layout(
    "albert",
    ModelLayout(
        family="albert",
        stacks=_encoder(
            BlockLayout(
                attention="attention",
                attention_classes=("AlbertAttention", "AlbertSdpaAttention"),
                query="query",
                key="key",
                value="value",
                attention_output="attention.dense",
                attention_norm="attention.LayerNorm",
                ffn_input="ffn",
                ffn_output="ffn_output",
                ffn_norm="full_layer_layer_norm",
            ),
            path="encoder.albert_layer_groups.0.albert_layers",
            causal=False,
            shared_depth=True,
        ),
        embeddings="embeddings",
        lora_targets=("query", "value"),
    ),
)

register_layout(
    "gpt2",
    ModelLayout(
        family="gpt2",
        stacks=(
            StackLayout(
                role="decoder",
                path="h",
                causal=True,
                block=BlockLayout(
                    attention="attn",
                    attention_classes=("GPT2Attention",),
                    query="c_attn",
                    key="c_attn",
                    value="c_attn",
                    attention_output="attn.c_proj",
                    attention_norm="ln_1",
                    ffn_input="mlp.c_fc",
                    ffn_output="mlp.c_proj",
                    ffn_norm="ln_2",
                ),
            ),
        ),
        embeddings="wte",
        lora_targets=("c_attn",),
    ),
)


def _llama_block(prefix: str) -> BlockLayout:
    return BlockLayout(
        attention="self_attn",
        attention_classes=(f"{prefix}Attention",),
        query="q_proj",
        key="k_proj",
        value="v_proj",
        attention_output="self_attn.o_proj",
        attention_norm="input_layernorm",
        ffn_input="mlp.gate_proj",
        ffn_output="mlp.down_proj",
        ffn_norm="post_attention_layernorm",
        ffn=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    )


for _family, _prefix in (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2")):
    register_layout(
        _family,
        ModelLayout(
            family=_family,
            stacks=(StackLayout(role="decoder", path="layers", block=_llama_block(_prefix), causal=True),),
            embeddings="embed_tokens",
            lora_targets=("q_proj", "v_proj"),
        ),
    )


def _t5_block(prefix: str, *, decoder: bool) -> BlockLayout:
    ffn = "layer.2" if decoder else "layer.1"
    return BlockLayout(
        attention="layer.0.SelfAttention",
        attention_classes=(f"{prefix}Attention",),
        query="q",
        key="k",
        value="v",
        attention_output="layer.0.SelfAttention.o",
        attention_norm="layer.0.layer_norm",
        ffn_input=f"{ffn}.DenseReluDense.wi|{ffn}.DenseReluDense.wi_0",
        ffn_output=f"{ffn}.DenseReluDense.wo",
        ffn_norm=f"{ffn}.layer_norm",
        cross_attention="layer.1.EncDecAttention" if decoder else None,
        ffn=tuple(f"{ffn}.DenseReluDense.{p}" for p in ("wi", "wi_0", "wi_1", "wo")),
    )


for _family, _prefix in (("t5", "T5"), ("mt5", "MT5")):
    register_layout(
        _family,
        ModelLayout(
            family=_family,
            stacks=(
                StackLayout(
                    role="encoder",
                    path="encoder.block",
                    block=_t5_block(_prefix, decoder=False),
                    causal=False,
                ),
                StackLayout(
                    role="decoder", path="decoder.block", block=_t5_block(_prefix, decoder=True), causal=True
                ),
            ),
            embeddings="shared",
            lora_targets=("q", "v"),
        ),
    )


def _bart_block(*, decoder: bool) -> BlockLayout:
    return BlockLayout(
        attention="self_attn",
        attention_classes=("BartAttention", "BartSdpaAttention"),
        query="q_proj",
        key="k_proj",
        value="v_proj",
        attention_output="self_attn.out_proj",
        attention_norm="self_attn_layer_norm",
        ffn_input="fc1",
        ffn_output="fc2",
        ffn_norm="final_layer_norm",
        cross_attention="encoder_attn" if decoder else None,
    )


register_layout(
    "bart",
    ModelLayout(
        family="bart",
        stacks=(
            StackLayout(
                role="encoder", path="encoder.layers", block=_bart_block(decoder=False), causal=False
            ),
            StackLayout(role="decoder", path="decoder.layers", block=_bart_block(decoder=True), causal=True),
        ),
        embeddings="shared",
        lora_targets=("q_proj", "v_proj"),
    ),
)
