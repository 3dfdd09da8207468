"""A byte-level chat tokenizer built in code, for tiny random causal LMs in tests and smoke recipes.

It is a real ``transformers.PreTrainedTokenizerFast`` (so ``apply_chat_template``, offsets, ``decode`` and
``generate`` behave as with a pretrained tokenizer): every UTF-8 byte is one token (ids ``0..255``), and four
special tokens follow: ``<|pad|>`` 256, ``<|im_start|>`` 257, ``<|im_end|>`` 258 (end of turn and EOS),
``<|bos|>`` 259. The chat template is ChatML, the format SmolLM2 uses. Pair it with a model whose
``vocab_size`` is at least :data:`BYTE_VOCAB_SIZE`.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["BYTE_VOCAB_SIZE", "CHATML_TEMPLATE", "byte_chat_tokenizer"]

_SPECIALS = ("<|pad|>", "<|im_start|>", "<|im_end|>", "<|bos|>")
#: Size of the id space of :func:`byte_chat_tokenizer`.
BYTE_VOCAB_SIZE = 256 + len(_SPECIALS)

#: ChatML: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message, then ``<|im_start|>assistant\n``.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_chat_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer without merges (one token per byte) with ChatML specials and template."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes
    byte_to_unicode = sorted(alphabet, key=_byte_of)
    vocab = {char: i for i, char in enumerate(byte_to_unicode)}
    vocab.update({tok: 256 + i for i, tok in enumerate(_SPECIALS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token="<|bos|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _byte_of(char: str) -> int:
    """The byte a ByteLevel stand-in character represents (GPT-2's ``bytes_to_unicode`` inverted)."""
    code = ord(char)
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
