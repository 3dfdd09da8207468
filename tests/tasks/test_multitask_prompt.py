"""T0-style multi-task training: answer NLL by hand, per-task rank accuracy, held-out tasks never trained."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_peft.tasks.data import DEMO_TRAIN, DEMO_VAL
from lightning_peft.tasks.multitask_prompt import MultiTaskPromptData, MultiTaskPromptLM
from tests.prompting.helpers import build_bpe_tokenizer

LABELS = ["negative", "positive"]


def head(src: Path, dst: Path, n: int) -> str:
    with src.open(newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    with dst.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return str(dst)


@pytest.fixture
def setup(tmp_path: Path):
    tok = build_bpe_tokenizer()
    torch.manual_seed(0)
    config = {
        "model_type": "gpt2",
        "n_embd": 32,
        "n_layer": 1,
        "n_head": 2,
        "n_positions": 128,
        "vocab_size": len(tok),
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    tasks = [
        {"name": "sentiment", "template": "{text} It was {answer}", "choices": ["bad", "good"]},
        {"name": "liked", "template": "Review: {text} Did they like it? {answer}", "choices": ["no", "yes"]},
    ]
    train, val = head(Path(DEMO_TRAIN), tmp_path / "t.csv", 16), head(Path(DEMO_VAL), tmp_path / "v.csv", 6)
    files = [{"name": t["name"], "train_path": train, "val_path": val, "label_names": LABELS} for t in tasks]
    model = MultiTaskPromptLM(tasks, config=config, tokenizer=tok, learning_rate=1e-2)
    data = MultiTaskPromptData(files, held_out=["liked"], batch_size=4)
    return model, data, tok


def test_loss_is_the_token_mean_nll_of_the_correct_answer(setup) -> None:
    model, data, tok = setup
    batch = next(iter(data.train_dataloader()))
    assert set(batch["task"]) == {"sentiment"}  # the held-out task is never trained on
    model.eval()
    losses = []
    for ex, label in zip(batch["examples"], batch["labels"].tolist(), strict=True):
        p = tok.encode(f"{ex['slots']['text']} It was", add_special_tokens=False)
        a = tok.encode(" " + ["bad", "good"][label], add_special_tokens=False)
        with torch.no_grad():
            logits = model.model(input_ids=torch.tensor([p + a])).logits[0].log_softmax(-1)
        losses.append(-sum(float(logits[len(p) + i - 1, t]) for i, t in enumerate(a)) / len(a))
    with torch.no_grad():
        loss = model.answer_nll(batch)
    assert loss.item() == pytest.approx(sum(losses) / len(losses), abs=1e-4)


def test_fit_logs_rank_accuracy_per_task(setup, tmp_path: Path) -> None:
    model, data, _ = setup
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    metrics = trainer.validate(model, data, verbose=False)
    flat = {k: v for m in metrics for k, v in m.items()}
    assert {"val/sentiment/acc", "val/liked/acc"} <= set(flat)
    assert flat["val/acc"] == pytest.approx((flat["val/sentiment/acc"] + flat["val/liked/acc"]) / 2, abs=1e-6)


def test_bad_multitask_setups(setup) -> None:
    with pytest.raises(ValueError, match="held_out names unknown"):
        MultiTaskPromptData([{"name": "a"}], held_out=["b"])
    with pytest.raises(ValueError, match="unique"):
        MultiTaskPromptLM(
            [{"name": "a", "template": "{text} {answer}", "choices": ["x", "y"]}] * 2,
            config={"model_type": "gpt2", "n_embd": 8, "n_layer": 1, "n_head": 1},
            tokenizer=setup[2],
        )
