"""A tiny LightningModule and data for Trainer tests (CPU, seconds)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.models import tiny_model


class TinyClassifier(L.LightningModule):
    """A tiny BERT with a linear head; ``build_in_configure_model`` defers building to that hook."""

    def __init__(self, seed: int = 0, build_in_configure_model: bool = False, lr: float = 5e-3) -> None:
        super().__init__()
        self.seed, self.lr = seed, lr
        self.backbone: nn.Module | None = None
        self.classifier: nn.Module | None = None
        if not build_in_configure_model:
            self._build()
        self.build_in_configure_model = build_in_configure_model

    def _build(self) -> None:
        self.backbone = tiny_model("bert", seed=self.seed).train()
        torch.manual_seed(self.seed + 1)
        self.classifier = nn.Linear(32, 2)

    def configure_model(self) -> None:
        if self.backbone is None:
            self._build()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        assert self.backbone is not None and self.classifier is not None
        return self.classifier(self.backbone(input_ids=ids).last_hidden_state[:, 0])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, y = batch
        return nn.functional.cross_entropy(self(ids), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        ids, y = batch
        self.log("val_acc", (self(ids).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def tiny_loader(n: int = 48, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (n, 10), generator=g)
    y = (ids[:, 1] > 48).long()
    return DataLoader(TensorDataset(ids, y), batch_size=batch_size, shuffle=True)


def trainer(tmp_path: Any, callbacks: list, **kw: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )
    defaults.update(kw)
    return L.Trainer(callbacks=callbacks, **defaults)
