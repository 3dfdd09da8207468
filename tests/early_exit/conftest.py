"""Fixtures for early-exit tests: tiny 4-layer encoders of every family with exit heads, padded batches."""

from __future__ import annotations

import pytest
import torch

from tests.early_exit.helpers import padded_batch


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return padded_batch()
