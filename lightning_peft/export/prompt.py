"""Prompt tuning, P-tuning and prefix tuning <-> Hugging Face PEFT ``PROMPT_TUNING`` / ``P_TUNING`` /
``PREFIX_TUNING``.

peft keeps one tensor per prompt-learning adapter, ``prompt_embeddings``, holding what the model consumes,
not what was trained:

================  =====================================  ==================================================
method            ``prompt_embeddings``                  ours
================  =====================================  ==================================================
prompt tuning     the prompt ``(n, d)``                  ``prompt_encoder.embedding.weight``
P-tuning          the encoder's output ``(n, d)``        ``prompt_encoder()``; imported as a plain prompt
                                                         (a :class:`PromptTuningConfig`), as peft loads it
prefix tuning     the folded table ``(l, 2 L w)``        ``prompt_encoder.all_prefixes()`` (MLP folded);
                                                         imported as plain prefixes
================  =====================================  ==================================================

The table's last axis is ``(layer, key/value, head, head dim)`` in both libraries. Encoder-decoder models
(T5, prompt tuning and P-tuning): we write ``num_transformer_submodules=1`` and ``n`` rows; an adapter
peft saved with its default 2 has ``2n`` rows of which peft's forward and ``generate`` only use the first
``n`` (the encoder's prompt), which is what we load. Tensors trained next to
the prompt (``modules_to_save``, e.g. a classifier) are stored by peft as ``base_model.<name>``.
``task_type`` is read from the model class (``...ForCausalLM`` -> ``CAUSAL_LM``, a bare encoder ->
``FEATURE_EXTRACTION``, ...), since peft picks the forward that inserts the prompt by it.

Prefix tuning on encoder-decoder models (T5): peft prefixes the decoder's self-attention only, so we
export ``sites=["decoder_self"]`` and import as that. peft cuts its ``(l, 2 L w)`` table into ``L`` slots
but decoder layer ``i`` reads slot ``2i mod L`` (its key/value split interleaves the self- and
cross-attention halves; the cross half is then discarded), see :func:`peft_seq2seq_prefix_slots`. With
an even ``L`` two layers share a slot, so a table whose layers ``i`` and ``i + L/2`` differ has no peft
form and is refused.

Refused: prefix tuning with ``shift_positions=False`` (peft always shifts positions), peft options that
change the computation (multi-task prompts, ``num_transformer_submodules`` other than ours).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.export.hf_peft import register_peft_format
from lightning_peft.tuners.prefix import PrefixEncoder, PrefixTuningConfig
from lightning_peft.tuners.prompt import PROMPT_ATTR, PromptTuningConfig, VirtualTokens, hf_root

__all__ = [
    "PTuningFormat",
    "PrefixTuningFormat",
    "PromptTuningFormat",
    "peft_seq2seq_prefix_slots",
    "task_type_of",
]

#: peft's key for the prompt-learning tensor, and its prefix for ``modules_to_save`` tensors.
PROMPT_KEY = "prompt_embeddings"
SAVED_PREFIX = "base_model."

_TASKS = (
    (("ForCausalLM", "LMHeadModel"), "CAUSAL_LM"),
    (("ForConditionalGeneration", "ForSeq2SeqLM"), "SEQ_2_SEQ_LM"),
    (("ForSequenceClassification",), "SEQ_CLS"),
    (("ForTokenClassification",), "TOKEN_CLS"),
    (("ForQuestionAnswering",), "QUESTION_ANS"),
)


def task_type_of(root: nn.Module) -> str:
    """peft's ``task_type`` for a Hugging Face model, from its class name."""
    name = type(root).__name__
    for suffixes, task in _TASKS:
        if name.endswith(suffixes):
            return task
    return "FEATURE_EXTRACTION"


def _submodules(root: nn.Module) -> int:
    """peft's ``num_transformer_submodules``: 2 for encoder-decoder models, else 1."""
    return 2 if getattr(root.config, "is_encoder_decoder", False) else 1


def _owner(root: nn.Module) -> nn.Module:
    """The Hugging Face model holding the prompt module (``root`` itself, or the inner one)."""
    return hf_root(root, "export", encoder_decoder=True)


def _common(
    root: nn.Module, adapters: list[str], to_save: list[str], n: int, submodules: int = 1
) -> dict[str, Any]:
    config = _owner(root).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "task_type": task_type_of(root),
        "num_virtual_tokens": n,
        "token_dim": int(_owner(root).get_input_embeddings().weight.shape[1]),
        "num_transformer_submodules": submodules,
        "num_attention_heads": int(text.num_attention_heads),
        "num_layers": int(text.num_hidden_layers),
        "modules_to_save": to_save or None,
    }


def _module(root: nn.Module, adapters: list[str], kind: type) -> nn.Module:
    found = [root.get_submodule(a) for a in adapters]
    if len(found) != 1 or not isinstance(found[0], kind):
        raise ValueError(f"expected one {kind.__name__} in the model, found {adapters}")
    return found[0]


class _PromptLearningFormat:
    """What the three methods share: one ``prompt_embeddings`` tensor plus ``modules_to_save``."""

    kind: type = VirtualTokens
    common_fields = frozenset(
        {
            "num_virtual_tokens",
            "token_dim",
            "num_transformer_submodules",
            "num_attention_heads",
            "num_layers",
            "modules_to_save",
        }
    )

    def adapter_modules(self, root: nn.Module) -> list[str]:
        return [n for n, m in root.named_modules() if n.endswith(PROMPT_ATTR) and isinstance(m, self.kind)]

    def table(self, module: nn.Module) -> Tensor:
        """The tensor peft stores for ``module``: what the model consumes (prompt or encoder output)."""
        return module()

    def to_peft_weights(self, inside: Mapping[str, Tensor], root: nn.Module) -> dict[str, Tensor]:
        adapters = self.adapter_modules(root)
        module = _module(root, adapters, self.kind)
        prompt = tuple(f"{a}." for a in adapters)
        out = {SAVED_PREFIX + k: v for k, v in inside.items() if not k.startswith(prompt)}
        out[PROMPT_KEY] = self.table(module).detach()
        return out

    def from_peft_weights(self, weights: Mapping[str, Tensor], root: nn.Module) -> dict[str, Tensor]:
        if PROMPT_KEY not in weights:
            raise ValueError(f"no {PROMPT_KEY!r} tensor in the adapter file (keys: {sorted(weights)})")
        (name,) = self.adapter_modules(root)
        table, module = weights[PROMPT_KEY], root.get_submodule(name)
        n = module.num_virtual_tokens
        if isinstance(module, VirtualTokens) and table.shape[0] == 2 * n and _submodules(root) == 2:
            table = table[:n]  # peft's seq2seq prompt: only the first n rows reach the encoder
        out = {f"{name}.embedding.weight": table}
        for key, value in weights.items():
            if key != PROMPT_KEY:
                out[key.removeprefix(SAVED_PREFIX)] = value
        return out

    def check_loaded(self, data: Mapping[str, Any], root: nn.Module) -> None:
        """Shapes are checked when the weights load."""

    def allowed_submodules(self, root: nn.Module) -> set[int]:
        return {_submodules(root)}

    def modules_to_save(self, data: Mapping[str, Any], root: nn.Module) -> list[str] | None:
        allowed = self.allowed_submodules(root)
        if int(data.get("num_transformer_submodules") or 1) not in allowed:
            raise ValueError(
                f"num_transformer_submodules={data.get('num_transformer_submodules')} does not fit "
                f"{type(root).__name__} (expected {' or '.join(map(str, sorted(allowed)))})"
            )
        # peft's task models list their head names (e.g. "classifier" and "score"): keep those present.
        names = {n for n, _ in root.named_modules() if n}
        keep = sorted({m for m in data.get("modules_to_save") or [] if m in names})
        return keep or None


class PromptTuningFormat(_PromptLearningFormat):
    method = "prompt"
    peft_type = "PROMPT_TUNING"
    handled_fields = _PromptLearningFormat.common_fields | {
        "prompt_tuning_init",
        "prompt_tuning_init_text",
        "tokenizer_name_or_path",
        "tokenizer_kwargs",
    }

    def allowed_submodules(self, root: nn.Module) -> set[int]:
        # Encoder-decoder: peft's default 2 keeps 2n rows of which its prompt-tuning forward and generate
        # use the first n (encoder side only); we write 1 and n rows.
        return {1, _submodules(root)}

    def to_peft_config(
        self, config: Any, root: nn.Module, adapters: list[str], modules_to_save: list[str]
    ) -> dict[str, Any]:
        assert isinstance(config, PromptTuningConfig)
        # The initialisation only matters before training; "RANDOM" needs no tokenizer to load.
        return {
            **_common(root, adapters, modules_to_save, config.num_virtual_tokens),
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
        }

    def from_peft_config(self, data: Mapping[str, Any], root: nn.Module) -> PromptTuningConfig:
        return PromptTuningConfig(
            num_virtual_tokens=int(data["num_virtual_tokens"]),
            modules_to_save=self.modules_to_save(data, root),
        )


class PTuningFormat(PromptTuningFormat):
    """Exported as the encoder's output; imported as a plain prompt of that value (what peft does)."""

    method = "ptuning"
    peft_type = "P_TUNING"
    handled_fields = _PromptLearningFormat.common_fields | {
        "encoder_reparameterization_type",
        "encoder_hidden_size",
        "encoder_num_layers",
        "encoder_dropout",
    }

    def to_peft_config(
        self, config: Any, root: nn.Module, adapters: list[str], modules_to_save: list[str]
    ) -> dict[str, Any]:
        return {
            **_common(root, adapters, modules_to_save, config.num_virtual_tokens),
            "encoder_reparameterization_type": config.encoder.upper(),
            "encoder_hidden_size": config.encoder_hidden_size
            or int(_owner(root).get_input_embeddings().weight.shape[1]),
            "encoder_num_layers": config.encoder_num_layers,
            "encoder_dropout": config.encoder_dropout,
        }


def peft_seq2seq_prefix_slots(layers: int) -> list[int]:
    """The slot of peft's prefix table that decoder layer ``i`` of an encoder-decoder model reads.

    peft views the table as ``(l, 2L, H, D)``, repeats it along the layer axis to ``4L`` rows and splits
    those into ``L`` groups of four (self key, self value, cross key, cross value): group ``i`` starts at
    row ``4i``, which is row ``4i mod 2L`` of the original, i.e. slot ``2i mod L``.
    """
    return [(2 * i) % layers for i in range(layers)]


def _by_layer(table: Tensor, layers: int) -> Tensor:
    """``(l, L * 2w) -> (l, L, 2w)``: one column block per layer (key/value, head, head dim inside)."""
    return table.reshape(table.shape[0], layers, -1)


class PrefixTuningFormat(_PromptLearningFormat):
    """Exported folded (plain prefixes, whatever ``projection`` was); imported as plain prefixes."""

    method = "prefix"
    peft_type = "PREFIX_TUNING"
    kind = PrefixEncoder
    handled_fields = _PromptLearningFormat.common_fields | {
        "prefix_projection",
        "encoder_hidden_size",
        "init_weights",
    }

    def table(self, module: nn.Module) -> Tensor:
        assert isinstance(module, PrefixEncoder)
        return module.all_prefixes()  # (l, 2 L w)

    def to_peft_weights(self, inside: Mapping[str, Tensor], root: nn.Module) -> dict[str, Tensor]:
        out = super().to_peft_weights(inside, root)
        if _submodules(root) == 2:  # decoder layer i -> slot 2i mod L (checked representable on export)
            table = out[PROMPT_KEY]
            layers = table.shape[1] // self._width(root)
            ours, peft_slots = _by_layer(table, layers), torch.zeros_like(_by_layer(table, layers))
            for i, slot in enumerate(peft_seq2seq_prefix_slots(layers)):
                peft_slots[:, slot] = ours[:, i]
            out[PROMPT_KEY] = peft_slots.reshape(table.shape)
        return out

    def from_peft_weights(self, weights: Mapping[str, Tensor], root: nn.Module) -> dict[str, Tensor]:
        out = super().from_peft_weights(weights, root)
        if _submodules(root) == 2:
            (key,) = [k for k in out if k.endswith(f"{PROMPT_ATTR}.embedding.weight")]
            peft_table = out[key]
            layers = peft_table.shape[1] // self._width(root)
            slots = peft_seq2seq_prefix_slots(layers)
            out[key] = _by_layer(peft_table, layers)[:, slots].reshape(peft_table.shape)
        return out

    @staticmethod
    def _width(root: nn.Module) -> int:
        encoder = _module(root, PrefixTuningFormat().adapter_modules(root), PrefixEncoder)
        assert isinstance(encoder, PrefixEncoder)
        return 2 * encoder.heads * encoder.head_dim

    def _check_seq2seq(self, config: PrefixTuningConfig, root: nn.Module, encoder: PrefixEncoder) -> None:
        if config.sites != ["decoder_self"]:
            raise ValueError(
                f"peft's prefix tuning on {type(root).__name__} prefixes the decoder's self-attention only; "
                f"this adapter has sites={config.sites or ['encoder_self', 'decoder_self', 'cross']}: train "
                'with PrefixTuningConfig(sites=["decoder_self"]) to export it'
            )
        text = _owner(root).config
        decoder_layers = int(getattr(text, "num_decoder_layers", None) or text.num_hidden_layers)
        if decoder_layers != int(text.num_hidden_layers):
            raise ValueError(
                f"peft sizes the prefix table by the encoder's {text.num_hidden_layers} layers, but the "
                f"decoder has {decoder_layers}: no peft form"
            )
        table = _by_layer(encoder.all_prefixes().detach(), encoder.num_layers)
        slots = peft_seq2seq_prefix_slots(encoder.num_layers)
        for i, slot in enumerate(slots):
            j = slots.index(slot)
            if j != i and not torch.equal(table[:, i], table[:, j]):
                raise ValueError(
                    f"peft's layout gives decoder layers {j} and {i} the same prefix (slot {slot} of "
                    f"{encoder.num_layers}: peft reads slot 2i mod L), but this adapter trained different "
                    "prefixes for them, so it has no peft form; keep it in this library's format"
                )

    def to_peft_config(
        self, config: Any, root: nn.Module, adapters: list[str], modules_to_save: list[str]
    ) -> dict[str, Any]:
        assert isinstance(config, PrefixTuningConfig)
        if not config.shift_positions:
            raise ValueError(
                "prefix tuning with shift_positions=False has no peft equivalent (peft's prefixes always "
                "move the real tokens to positions l, l+1, ...)"
            )
        encoder = _module(root, adapters, PrefixEncoder)
        assert isinstance(encoder, PrefixEncoder)
        if _submodules(root) == 2:
            self._check_seq2seq(config, root, encoder)
        return {
            **_common(root, adapters, modules_to_save, config.num_virtual_tokens, _submodules(root)),
            # peft's (num_attention_heads, token_dim) describe the key/value heads the prefix is cut into.
            "num_attention_heads": encoder.heads,
            "token_dim": encoder.heads * encoder.head_dim,
            "num_layers": encoder.num_layers,
            "prefix_projection": False,  # the table written is folded
            "encoder_hidden_size": config.encoder_hidden_size,
            "init_weights": None,
        }

    def from_peft_config(self, data: Mapping[str, Any], root: nn.Module) -> PrefixTuningConfig:
        return PrefixTuningConfig(
            num_virtual_tokens=int(data["num_virtual_tokens"]),
            modules_to_save=self.modules_to_save(data, root),
            sites=["decoder_self"] if _submodules(root) == 2 else None,
        )


register_peft_format(PromptTuningFormat())
register_peft_format(PTuningFormat())
register_peft_format(PrefixTuningFormat())
