"""A module fitted again with new Trainers and new callbacks: nothing of an earlier fit stays wrapped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft.attention.base import get_attention
from lightning_peft.callbacks import PEFT, AttentionSwap
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer


def _lora() -> lp.LoRAConfig:
    return lp.LoRAConfig(r=4, modules_to_save=["classifier"])


def test_fit_again_with_new_trainer_and_callback_then_resume(tmp_path: Path) -> None:
    """Regression: the configure_model wrapper stayed bound to the first callback and the second fit
    failed with a bare AssertionError on its first checkpoint."""
    module = TinyClassifier()  # defines configure_model: the case that broke
    trainer(tmp_path / "one", [PEFT(_lora())], max_epochs=1).fit(module, tiny_loader())
    assert "configure_model" not in vars(module), "the first fit's wrapper must be undone in teardown"
    ckpt = ModelCheckpoint(dirpath=tmp_path / "two" / "ckpt", save_last=True)
    trainer(tmp_path / "two", [PEFT(_lora()), ckpt], max_epochs=1).fit(module, tiny_loader())
    path = tmp_path / "two" / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=False)
    steps = len(tiny_loader())
    assert saved["global_step"] == steps
    trained = {k: v.clone() for k, v in lp.trainable_state_dict(module).items()}

    run = trainer(tmp_path / "three", [PEFT(_lora())], max_epochs=2)
    starts: list[int] = []
    module.on_train_batch_start = lambda *_: starts.append(run.global_step)  # type: ignore[method-assign]
    module.on_train_start = lambda: [  # type: ignore[method-assign]
        torch.testing.assert_close(v, trained[k], rtol=0, atol=0)
        for k, v in lp.trainable_state_dict(module).items()
    ]
    run.fit(module, tiny_loader(), ckpt_path=str(path))
    assert starts[0] == steps, "the resumed run must start at the checkpoint's step"
    assert run.global_step == 2 * steps


def test_a_second_fit_with_another_config_is_refused_until_unloaded(tmp_path: Path) -> None:
    module = TinyClassifier()
    trainer(tmp_path / "one", [PEFT(_lora())]).fit(module, tiny_loader())
    bitfit = lp.BitFitConfig(modules_to_save=["classifier"])
    with pytest.raises(ValueError, match="different tuner"):
        trainer(tmp_path / "two", [PEFT(bitfit)]).fit(module, tiny_loader())
    lp.unload(module, merge_weights=False)
    trainer(tmp_path / "three", [PEFT(bitfit)]).fit(module, tiny_loader())
    assert lp.get_config(module).method == "bitfit"
    assert not any("lora" in k for k in lp.trainable_state_dict(module))


def test_attention_swap_and_peft_wraps_undo_in_any_order(tmp_path: Path) -> None:
    module = TinyClassifier()
    get_attention("sdpa")
    for order in ((0, 1), (1, 0)):
        callbacks = [AttentionSwap("sdpa", target="backbone"), PEFT(_lora())]
        trainer(tmp_path / str(order), [callbacks[i] for i in order]).fit(module, tiny_loader())
        assert "configure_model" not in vars(module)
