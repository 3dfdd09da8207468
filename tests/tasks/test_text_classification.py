"""TextClassifier: construction, pooling, optimisation of trainable parameters only, real MiniLM forward."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_peft.tasks import TextClassificationData, TextClassifier
from tests.tasks.helpers import TINY_CAUSAL, TINY_VOCAB, write_rows

POSITIVE = [
    "good film",
    "great phone",
    "lovely day",
    "good great",
    "great screen",
    "lovely song",
    "good",
    "great",
]
NEGATIVE = ["bad film", "awful phone", "poor day", "bad awful", "awful screen", "poor song", "bad", "awful"]


def trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


@pytest.fixture
def separable(tmp_path: Path) -> TextClassificationData:
    rows = [{"text": t, "label": "pos"} for t in POSITIVE] + [{"text": t, "label": "neg"} for t in NEGATIVE]
    path = write_rows(tmp_path / "tiny.csv", rows)
    return TextClassificationData(
        str(path), str(path), tokenizer="whitespace", vocab_size=TINY_VOCAB, batch_size=16, seed=0
    )


def full_loss(model: TextClassifier, data: TextClassificationData) -> float:
    model.eval()
    with torch.no_grad():
        batch = next(iter(data.val_dataloader()))
        loss = F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"]).item()
    model.train()
    return loss


def test_tiny_model_trains_and_loss_falls(
    tmp_path: Path, tiny_config: dict[str, Any], separable: TextClassificationData
) -> None:
    torch.manual_seed(0)
    model = TextClassifier(
        config=tiny_config, num_labels=2, learning_rate=3e-3, warmup_ratio=0.0, dropout=0.0
    )
    separable.setup("fit")
    before = full_loss(model, separable)
    trainer(tmp_path, max_steps=3, limit_val_batches=1, num_sanity_val_steps=0).fit(model, separable)
    after = full_loss(model, separable)
    assert after < before - 0.05, (before, after)
    assert {"train/loss", "val/loss", "val/acc", "val/f1"} <= set(model.trainer.callback_metrics)


def test_optimizer_only_holds_parameters_trainable_when_it_runs(
    tmp_path: Path, tiny_config: dict[str, Any], separable: TextClassificationData
) -> None:
    torch.manual_seed(0)
    model = TextClassifier(config=tiny_config, learning_rate=1e-2, warmup_ratio=0.0)
    model.backbone.requires_grad_(False)  # what a PEFT callback does in setup
    frozen = copy.deepcopy(model.backbone.state_dict())
    head = model.classifier.weight.detach().clone()
    fit = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    fit.fit(model, separable)
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(model.classifier.weight), id(model.classifier.bias)}
    decays = sorted(g["weight_decay"] for g in fit.optimizers[0].param_groups)
    assert decays == [0.0, 0.01]  # the bias is not decayed
    assert all(torch.equal(v, frozen[k]) for k, v in model.backbone.state_dict().items())
    assert not torch.equal(model.classifier.weight, head)


def test_nothing_trainable_is_an_error(tmp_path: Path, tiny_config: dict[str, Any], separable) -> None:
    model = TextClassifier(config=tiny_config).requires_grad_(False)
    with pytest.raises(RuntimeError, match="no parameter with requires_grad=True"):
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, separable)


def test_linear_warmup_then_decay(tmp_path: Path, tiny_config: dict[str, Any], separable) -> None:
    lrs: list[float] = []

    class RecordLR(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    model = TextClassifier(config=tiny_config, learning_rate=0.1, warmup_ratio=0.5)
    trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[RecordLR()]).fit(model, separable)
    assert lrs == pytest.approx([0.0, 0.05, 0.1, 0.05])


def test_mean_pooling_ignores_padding_and_cls_takes_first_token(tiny_config: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = TextClassifier(config=tiny_config).eval()
    ids = torch.tensor([[1, 7, 8, 9, 2]])
    padded = torch.tensor([[1, 7, 8, 9, 2, 0, 0], [1, 5, 2, 0, 0, 0, 0]])
    mask = (padded != 0).long()
    with torch.no_grad():
        alone = model(ids, torch.ones_like(ids))
        batched = model(padded, mask)
        assert torch.allclose(alone[0], batched[0], atol=1e-5)
        hidden = torch.randn(2, 3, 4)
        pooled = model.pool(hidden, torch.tensor([[1, 1, 0], [1, 0, 0]]))
        assert torch.allclose(pooled, torch.stack([hidden[0, :2].mean(0), hidden[1, 0]]))
        model.pooling = "cls"
        assert torch.equal(model.pool(hidden, torch.ones(2, 3)), hidden[:, 0])


def test_last_pooling_takes_the_last_real_token_with_either_padding_side() -> None:
    model = TextClassifier(config=TINY_CAUSAL["llama"]).eval()
    assert model.pooling == "last"  # "auto" on a causal decoder
    hidden = torch.randn(3, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]])  # right padding, left padding, none
    torch.testing.assert_close(
        model.pool(hidden, mask), torch.stack([hidden[0, 2], hidden[1, 3], hidden[2, 3]])
    )
    # A decoder's last real token is what a padded batch and the unpadded sequence agree on.
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        alone = model(ids, torch.ones_like(ids))
        right = model(torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]))
    torch.testing.assert_close(alone, right, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("model_type", "expected"), [("bert", "mean"), ("gpt2", "last"), ("llama", "last"), ("t5", "mean")]
)
def test_auto_pooling_is_last_token_for_causal_decoders_only(model_type: str, expected: str) -> None:
    from tests.models import TINY_CONFIGS

    config = {"model_type": model_type, "vocab_size": 97, **TINY_CONFIGS[model_type]}
    assert TextClassifier(config=config).pooling == expected
    assert TextClassifier(config=config, pooling="cls").pooling == "cls"  # an explicit choice is kept


def test_structure_for_tuners(tiny_config: dict[str, Any]) -> None:
    model = TextClassifier(config=tiny_config, num_labels=5)
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.out_features == 5
    assert getattr(model.backbone, "pooler", None) is None  # unused pooler dropped (DDP, "all-linear")
    assert model.hparams.config == tiny_config


def test_constructor_errors(tiny_config: dict[str, Any]) -> None:
    with pytest.raises(FileNotFoundError, match=r"never downloads models.*--local-dir"):
        TextClassifier("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match="not both"):
        TextClassifier("minilm", config=tiny_config)
    with pytest.raises(ValueError, match="needs a 'model_type'"):
        TextClassifier(config={"hidden_size": 32})
    with pytest.raises(ValueError, match="pooling must be 'auto', 'cls', 'mean' or 'last'"):
        TextClassifier(config=tiny_config, pooling="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_labels must be >= 2"):
        TextClassifier(config=tiny_config, num_labels=1)


def test_checkpoint_round_trip(tmp_path: Path, tiny_config: dict[str, Any], separable) -> None:
    torch.manual_seed(0)
    model = TextClassifier(config=tiny_config, num_labels=2)
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    fit.fit(model, separable)
    fit.save_checkpoint(tmp_path / "m.ckpt")
    restored = TextClassifier.load_from_checkpoint(tmp_path / "m.ckpt").eval()
    ids = torch.tensor([[1, 5, 6, 2]])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids, torch.ones_like(ids)), restored(ids, torch.ones_like(ids)))


@pytest.mark.slow
def test_real_minilm_forward() -> None:
    data = TextClassificationData(tokenizer="minilm")
    model = TextClassifier("minilm", num_labels=2)
    assert getattr(model.backbone, "pooler", None) is None
    assert all(m.training for m in model.modules())  # from_pretrained's eval() is undone (dropout trains)
    model.eval()
    enc = data.tokenizer(["The plot was not good.", "Great!"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc)
        alone = model(**data.tokenizer(["Great!"], return_tensors="pt"))
        trio = data.tokenizer(
            ["The movie was great.", "The film was excellent.", "My phone battery died."],
            padding=True,
            return_tensors="pt",
        )
        pooled = model.pool(model.backbone(**trio).last_hidden_state, trio["attention_mask"])
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert torch.allclose(logits[1], alone[0], atol=1e-4)  # padding does not leak into the mean
    # pretrained weights really loaded: mean-pooled MiniLM embeddings put paraphrases close together
    similar = F.cosine_similarity(pooled[0], pooled[1], dim=0)
    unrelated = F.cosine_similarity(pooled[0], pooled[2], dim=0)
    assert similar > 0.7 and unrelated < 0.4, (similar, unrelated)


def test_mean_pooling_counts_prepended_virtual_tokens() -> None:
    model = TextClassifier(
        config={
            "model_type": "bert",
            "hidden_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 16,
            "vocab_size": 32,
        }
    )
    hidden = torch.arange(2 * 5 * 8, dtype=torch.float32).reshape(2, 5, 8)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # 2 virtual tokens in front of 3 real positions
    pooled = model.pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :4].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))


def test_accuracy_is_the_fraction_correct_and_balanced_accuracy_has_its_own_name(
    tmp_path: Path, tiny_config: dict[str, Any]
) -> None:
    # Imbalanced labels (a: 6, b: 3, c: 1) and a head that predicts "a" for everything: 60% of the predictions
    # are correct, the mean per-class recall is (1 + 0 + 0) / 3.
    rows = [{"text": f"w{i} x", "label": label} for i, label in enumerate("aaaaaabbbc")]
    path = write_rows(tmp_path / "imbalanced.csv", rows)
    data = TextClassificationData(
        str(path), str(path), tokenizer="whitespace", vocab_size=TINY_VOCAB, batch_size=4
    )
    model = TextClassifier(config=tiny_config, num_labels=3)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([2.0, 0.0, 1.0]))
    labels, preds = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            preds += model.eval()(batch["input_ids"], batch["attention_mask"]).argmax(-1).tolist()
            labels += batch["labels"].tolist()
    accuracy = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)
    recalls = [
        sum(p == y == c for p, y in zip(preds, labels, strict=True)) / labels.count(c) for c in set(labels)
    ]
    assert (accuracy, sum(recalls) / len(recalls)) == pytest.approx((0.6, 1 / 3))
    for split, run in (("val", "validate"), ("test", "test")):
        data.paths["test"] = str(path)
        results = getattr(trainer(tmp_path), run)(model, datamodule=data, verbose=False)[0]
        assert results[f"{split}/acc"] == pytest.approx(accuracy)
        assert results[f"{split}/balanced_acc"] == pytest.approx(sum(recalls) / len(recalls))
