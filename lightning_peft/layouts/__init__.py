"""One map of model layouts: where everything sits inside each Hugging Face model family.

Every tuner, AdapterDrop, K-Adapter, prefix tuning, the unified design space, early exit and attention
swapping ask this module where a model keeps its blocks and what each block holds; nothing else in the
package keeps a table of families. It depends on torch only, so the core, ``lightning_peft.attention`` and
the callbacks all import it.

A layout names, per model family (``config.model_type``):

* the block stacks, relative to the backbone (``model.base_model``), with an encoder-decoder's encoder and
  decoder kept apart (``encoder.block`` / ``decoder.block`` in T5) and whether each is causal;
* for one block of each stack: the self-attention module and its class names, the query / key / value
  projections (relative to the attention module), the attention output projection, the FFN input and output
  projections and the two LayerNorms (relative to the block);
* the embedding module and the default LoRA targets.

Paths are dotted attribute paths; ``"a|b"`` lists alternatives, the first that exists wins (T5's FFN input is
``wi`` or, when gated, ``wi_0``). Register your own architecture in one call::

    from lightning_peft.layouts import BlockLayout, ModelLayout, StackLayout, register_layout

    block = BlockLayout(attention="attn", attention_classes=("MyAttention",), query="q", key="k",
                        value="v", attention_output="attn.o", attention_norm="norm1",
                        ffn_input="mlp.fc1", ffn_output="mlp.fc2", ffn_norm="norm2")
    register_layout("my-model", ModelLayout(family="my-model", embeddings="embed",
                    stacks=(StackLayout(role="decoder", path="blocks", block=block, causal=True),),
                    lora_targets=("q", "v")))
"""

from lightning_peft.layouts import base as _base
from lightning_peft.layouts import families as _families  # registers the built-in layouts
from lightning_peft.layouts.base import *  # noqa: F403  (the public API: base.__all__)

__all__ = list(_base.__all__)
del _families
