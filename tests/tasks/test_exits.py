"""TextClassifier with exit heads: multi-exit training, per-exit validation metrics, adapter-only
checkpoints and exact resume across DeeBERT's two stages."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.callbacks.adapter_checkpoint import META_KEY
from lightning_peft.early_exit import exit_logits, predict
from lightning_peft.stack import TunerStack
from lightning_peft.tasks import TextClassificationData, TextClassifier

TINY = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 256,
}
WORDS = ["good", "bad", "fine", "awful", "great", "poor", "the", "a", "movie", "phone", "was", "is"]


class StopAt(L.Callback):
    """Ends run 1 of a two-run schedule at ``step``, like a job out of time (nothing more is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("end of run 1")


class StartStep(L.Callback):
    """Records the global step at which training (re)starts."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    for name, n in (("train", 64), ("val", 16)):
        with (tmp_path / f"{name}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for _ in range(n):
                text = " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=g).tolist())
                w.writerow([text, "pos" if ("good" in text or "great" in text) else "neg"])
    return tmp_path


def _fit(
    root: Path,
    data_dir: Path,
    config: lp.TunerConfig,
    max_steps: int,
    ckpt: str | None = None,
    extra: list | None = None,
    **kw: Any,
) -> tuple[TextClassifier, L.Trainer, StartStep]:
    L.seed_everything(3)
    model = TextClassifier(config=TINY, learning_rate=1e-2)
    data = TextClassificationData(
        str(data_dir / "train.csv"),
        str(data_dir / "val.csv"),
        tokenizer="whitespace",
        vocab_size=256,
        batch_size=8,
    )
    start = StartStep()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[
            PEFT(config),
            ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=4),
            start,
            *(extra or []),
        ],
        deterministic=True,
        **kw,
    )
    trainer.fit(model, data, ckpt_path=ckpt)
    return model, trainer, start


def test_validation_logs_every_exit_and_the_speedup(tmp_path: Path, data_dir: Path) -> None:
    cfg = lp.EarlyExitConfig(num_labels=2, criterion="patience", patience=1)
    model, trainer, _ = _fit(tmp_path, data_dir, cfg, 6, num_sanity_val_steps=0)
    logged = trainer.validate(model, trainer.datamodule, verbose=False)[0]
    # The oracle: every exit's logits and predict() over the validation set, batch by batch.
    model.eval()
    correct, layers, dyn_correct, labels_seen = torch.zeros(3), [], 0, 0
    for batch in trainer.datamodule.val_dataloader():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        all_logits = exit_logits(model.backbone, **inputs)
        correct += (all_logits.argmax(-1) == batch["labels"]).float().sum(1)
        logits, layer = predict(model.backbone, **inputs)
        dyn_correct += int((logits.argmax(-1) == batch["labels"]).sum())
        layers.append(layer)
        labels_seen += len(batch["labels"])
        assert torch.equal(model.predict_step(batch, 0), logits.argmax(-1))
        with torch.no_grad():  # forward is the model in full: the last exit
            torch.testing.assert_close(model(batch["input_ids"], batch["attention_mask"]), all_logits[-1])
    for j in range(3):
        assert logged[f"val/exit{j + 1}_acc"] == pytest.approx(float(correct[j]) / labels_seen, abs=1e-6)
    assert logged["val/dynamic_acc"] == pytest.approx(dyn_correct / labels_seen, abs=1e-6)
    avg = float(torch.cat(layers).float().mean())
    assert logged["val/avg_exit_layer"] == pytest.approx(avg, abs=1e-6)
    assert logged["val/layers_fraction"] == pytest.approx(avg / 3, abs=1e-6)
    assert logged["val/speedup"] > 0 and logged["val/time_full_s"] > 0
    ckpt = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"]) - {META_KEY}
    assert keys and all(k.startswith("backbone.exit_heads.") for k in keys)


def test_num_labels_mismatch_is_refused(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"num_labels=3\) but the task has num_labels=2"):
        _fit(tmp_path, data_dir, lp.EarlyExitConfig(num_labels=3, patience=1), 2, limit_val_batches=0)


def _deebert() -> TunerStack:
    return TunerStack(
        configs=[
            lp.LoRAConfig(r=2, target_modules=["query", "value"]),
            lp.EarlyExitConfig(
                num_labels=2, criterion="entropy", threshold=0.5, training="deebert", stage2_step=4
            ),
        ]
    )


def test_deebert_two_runs_resume_exactly_across_the_stage_switch(tmp_path: Path, data_dir: Path) -> None:
    full, _, _ = _fit(tmp_path / "full", data_dir, _deebert(), 8, limit_val_batches=0)
    with pytest.raises(RuntimeError, match="end of run 1"):  # run 1: stage 1 only, same schedule (max_steps)
        _fit(tmp_path / "run", data_dir, _deebert(), 8, extra=[StopAt(4)], limit_val_batches=0)
    saved = torch.load(tmp_path / "run/ckpt/last.ckpt", weights_only=False)
    assert saved["global_step"] == 4
    keys = set(saved["state_dict"]) - {META_KEY}
    assert all("lora_" in k or ".exit_heads." in k for k in keys)  # adapter-only: LoRA + heads
    assert any("lora_" in k for k in keys) and any(".exit_heads." in k for k in keys)
    stage1 = {
        k: v.clone() for k, v in lp.trainable_state_dict(_load(tmp_path / "run/ckpt/last.ckpt")).items()
    }
    resumed, _, start = _fit(
        tmp_path / "run",
        data_dir,
        _deebert(),
        8,
        ckpt=str(tmp_path / "run/ckpt/last.ckpt"),
        limit_val_batches=0,
    )
    assert start.step == 4  # the resumed run starts at the checkpoint's step, in stage 2
    a, b = lp.trainable_state_dict(full), lp.trainable_state_dict(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Stage 2 left LoRA and the final exit as stage 1 ended them; the other exits trained.
    frozen = [k for k in a if ".exit_heads.2." in k or "lora_" in k]
    assert frozen and all(torch.equal(a[k], stage1[k]) for k in frozen)
    assert any(not torch.equal(a[k], stage1[k]) for k in a if ".exit_heads.0." in k)


def _load(path: Path) -> TextClassifier:
    model = TextClassifier(config=TINY)
    lp.inject(model, _deebert())
    state = torch.load(path, weights_only=False)["state_dict"]
    lp.load_trainable_state_dict(model, {k: v for k, v in state.items() if k != META_KEY})
    return model


def test_cli_recipe_trains_and_validates_with_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_peft.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = str(Path(__file__).parents[2] / "configs" / "tiny_early_exit.yaml")
    main(["fit", "--config", recipe])
    out = capsys.readouterr().out
    assert "val/exit4_acc" in out and "val/speedup" in out and "val/avg_exit_layer" in out
    ckpt = tmp_path / "outputs/tiny_early_exit/checkpoints/last.ckpt"
    keys = set(torch.load(ckpt, weights_only=False)["state_dict"]) - {META_KEY}
    assert keys and all(k.startswith("backbone.exit_heads.") for k in keys)
    main(["validate", "--config", recipe, "--ckpt_path", str(ckpt)])
    assert "val/layers_fraction" in capsys.readouterr().out
