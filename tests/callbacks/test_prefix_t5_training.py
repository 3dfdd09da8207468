"""Prefix tuning on T5 (encoder self, decoder self and cross-attention prefixes) in a real Trainer run
with the PEFT callback: the base stays frozen, the checkpoint holds the prefixes only, and resuming equals
an uninterrupted run bitwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoConfig, T5ForConditionalGeneration

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.callbacks.adapter_checkpoint import META_KEY
from lightning_peft.tuners.prefix import PrefixTuningConfig
from tests.lit_helpers import trainer
from tests.models import TINY_CONFIGS, VOCAB
from tests.resume import ResumedFrom
from tests.tuners.test_prefix_t5 import T5_ROUTES


class TinySeq2Seq(L.LightningModule):
    """A tiny T5 learning to copy the first four input tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = T5ForConditionalGeneration(
            AutoConfig.for_model("t5", vocab_size=VOCAB, **TINY_CONFIGS["t5"])
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, mask = batch
        return self.model(input_ids=ids, attention_mask=mask, labels=ids[:, :4].contiguous()).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, VOCAB, (24, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 6:] = 0
    return DataLoader(TensorDataset(ids, mask), batch_size=6, shuffle=True)


def _config() -> PrefixTuningConfig:
    return PrefixTuningConfig(num_virtual_tokens=3, projection=True, encoder_hidden_size=8)


def _run(
    root: Path, epochs: int, ckpt_path: str | None = None, probe: L.Callback | None = None
) -> TinySeq2Seq:
    L.seed_everything(3)
    module = TinySeq2Seq()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)
    callbacks = [PEFT(_config(), check_gradients=True), ckpt, *([probe] if probe else [])]
    trainer(root, callbacks, max_epochs=epochs).fit(module, _loader(), ckpt_path=ckpt_path)
    return module


@pytest.mark.skipif(not T5_ROUTES, reason="this transformers runs T5 attention inline")
def test_t5_prefix_trains_saves_prefixes_only_and_resumes_exactly(
    tmp_path: Path, assert_resumed_from: ResumedFrom
) -> None:
    full = _run(tmp_path / "a", epochs=2)
    base = TinySeq2Seq()
    trainable = set(lp.trainable_state_dict(full))
    assert trainable and all("prompt_encoder" in k for k in trainable)
    frozen = {k: v for k, v in full.state_dict().items() if k not in trainable}
    for k, v in base.state_dict().items():
        assert torch.equal(frozen[k], v), k  # the base stayed frozen
    assert full.model.prompt_encoder.num_layers == 3 * 2  # encoder self + decoder self + cross, 2 layers

    _run(tmp_path / "b", epochs=1)
    saved = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=False)
    assert set(saved["state_dict"]) - {META_KEY} == trainable
    path = tmp_path / "b" / "ckpt" / "last.ckpt"
    probe = assert_resumed_from(path, global_step=4, epoch=1, batch=0)  # 4 batches per epoch
    resumed = _run(tmp_path / "b", epochs=2, ckpt_path=str(path), probe=probe)
    a, b = lp.trainable_state_dict(full), lp.trainable_state_dict(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
