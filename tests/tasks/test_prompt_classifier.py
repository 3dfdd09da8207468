"""PromptClassifier: PET's loss with any tuner, adapter-only checkpoints and exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.prompting.mlm import mask_tokens
from lightning_peft.tasks.pretrained import load_tokenizer
from lightning_peft.tasks.prompt_classifier import PromptClassifier
from lightning_peft.tasks.prompt_data import PromptData
from tests.prompting.helpers import build_bpe_tokenizer

BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 30522,
    "max_position_embeddings": 128,
}
VERBALIZER = {"negative": ["terrible", "bad"], "positive": ["great"]}


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("bpe")
    build_bpe_tokenizer().save_pretrained(folder)
    return str(folder)


def gpt2_config(vocab: int) -> dict[str, Any]:
    return {
        "model_type": "gpt2",
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "n_positions": 128,
        "vocab_size": vocab,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def bert_classifier(**kw: Any) -> PromptClassifier:
    torch.manual_seed(0)
    args: dict[str, Any] = dict(
        template="{text} It was {mask}.",
        verbalizer=VERBALIZER,
        config=BERT,
        tokenizer="minilm",
        max_length=48,
        learning_rate=5e-3,
    )
    args.update(kw)
    return PromptClassifier(**args)


def make_trainer(tmp_path: Path, callbacks: list, **kw: Any) -> L.Trainer:
    args: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        deterministic=True,
        limit_val_batches=2,
    )
    args.update(kw)
    return L.Trainer(callbacks=callbacks, **args)


def test_lora_prompt_training_learns_and_saves_adapters_only(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = bert_classifier(learning_rate=1e-2)
    data = PromptData(shots_per_class=8, batch_size=8, seed=1)
    batch = model.encode_examples([ex["slots"] for ex in data.train_examples()])
    labels = torch.tensor([ex["label"] for ex in data.train_examples()])

    def train_loss() -> float:
        model.eval()
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(batch), labels).item()

    before = train_loss()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    peft = PEFT(lp.LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
    trainer = make_trainer(tmp_path, [peft, ckpt], max_epochs=8)
    trainer.fit(model, data)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    state = torch.load(ckpt.last_model_path, weights_only=False)["state_dict"]
    assert {k for k in state if not k.startswith("__")} == trainable  # plus the metadata entry
    assert train_loss() < 0.95 * before  # PET's loss on the training examples went down


class StartStep(Callback):
    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = trainer.global_step


def test_resume_is_exact(tmp_path: Path) -> None:
    def run(max_steps: int, root: Path, ckpt_path: str | None = None) -> tuple[PromptClassifier, StartStep]:
        L.seed_everything(0)
        model = bert_classifier(soft_seed=3, template="{soft:2} {text} It was {mask}.", mlm_weight=0.1)
        start = StartStep()
        ckpt = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1)
        peft = PEFT(lp.BitFitConfig())
        trainer = make_trainer(root, [peft, ckpt, start], max_steps=max_steps, limit_val_batches=0)
        trainer.fit(model, PromptData(shots_per_class=8, batch_size=4, seed=2), ckpt_path=ckpt_path)
        return model, start

    full, _ = run(7, tmp_path / "a")  # checkpoints at steps 3 and 6; resume from step 3 as after a kill
    saved = next((tmp_path / "a").glob("*step=3.ckpt"))
    resumed, start = run(7, tmp_path / "c", ckpt_path=str(saved))
    assert start.step == 3  # the resumed run started where the checkpoint left off
    a, b = lp.trainable_state_dict(full), lp.trainable_state_dict(resumed)
    assert set(a) == set(b) and any(k.startswith("soft.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_causal_lm_with_prompt_tuning_and_full_fine_tuning(tmp_path: Path, bpe_folder: str) -> None:
    vocab = len(build_bpe_tokenizer())
    for callbacks in ([PEFT(lp.PromptTuningConfig(num_virtual_tokens=4))], []):
        L.seed_everything(0)
        model = PromptClassifier(
            template="{text} It was {answer}",
            verbalizer=VERBALIZER,
            config=gpt2_config(vocab),
            tokenizer=bpe_folder,
            learning_rate=1e-2,
        )
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        make_trainer(tmp_path, callbacks, max_steps=3, limit_val_batches=0).fit(
            model, PromptData(shots_per_class=4, batch_size=4)
        )
        changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
        if callbacks:
            assert not changed  # base frozen
            assert any("prompt_encoder" in n for n, p in model.named_parameters() if p.requires_grad)
        else:
            assert len(changed) == len(before)  # full fine-tuning moves every tensor


def test_auxiliary_mlm_loss_is_the_papers_weighting(tmp_path: Path) -> None:
    model = bert_classifier(mlm_weight=0.25)
    data = PromptData(shots_per_class=2, batch_size=4)
    batch = next(iter(data.train_dataloader()))
    model.train()
    torch.manual_seed(5)
    prepared = model.on_before_batch_transfer(batch, 0)
    torch.manual_seed(7)
    loss = model.training_step(prepared, 0)
    torch.manual_seed(7)
    ce = torch.nn.functional.cross_entropy(model(prepared["prompt"]), prepared["labels"])
    mlm = prepared["mlm"]
    logits = model.model(input_ids=mlm["input_ids"], attention_mask=mlm["attention_mask"]).logits
    mlm_loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), mlm["labels"].flatten(), ignore_index=-100
    )
    assert torch.allclose(loss, 0.75 * ce + 0.25 * mlm_loss, atol=1e-5)


def test_mask_tokens_80_10_10() -> None:
    bert_tokenizer = load_tokenizer("minilm")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (200, 100), generator=g)
    ids[:, 0], ids[:, -1] = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
    mask = torch.ones_like(ids)
    out, labels = mask_tokens(ids, mask, tokenizer=bert_tokenizer, generator=g)
    selected = labels != -100
    assert not selected[:, 0].any() and not selected[:, -1].any()
    assert abs(selected[:, 1:-1].float().mean().item() - 0.15) < 0.01
    masked = (out == bert_tokenizer.mask_token_id) & selected
    kept = (out == ids) & selected
    assert abs(masked.sum().item() / selected.sum().item() - 0.8) < 0.02
    assert abs(kept.sum().item() / selected.sum().item() - 0.1) < 0.02  # (+ random draws equal to the id)
    assert torch.equal(labels[selected], ids[selected])


def test_bad_setups(bpe_folder: str) -> None:
    vocab = len(build_bpe_tokenizer())
    with pytest.raises(ValueError, match="needs a masked LM"):
        PromptClassifier(
            template="{text} It was {answer}",
            verbalizer=VERBALIZER,
            config=gpt2_config(vocab),
            tokenizer=bpe_folder,
            mlm_weight=1e-4,
        )
    with pytest.raises(ValueError, match="only a masked LM can fill"):
        PromptClassifier(
            template="{text} It was {mask}.",
            verbalizer=VERBALIZER,
            config=gpt2_config(vocab),
            tokenizer=bpe_folder,
        )
    model = bert_classifier(verbalizer={"positive": ["great"], "negative": ["bad"]})
    with pytest.raises(ValueError, match="differ from the verbalizer"):
        make_trainer(Path("."), [], max_steps=1).fit(model, PromptData(shots_per_class=2))
