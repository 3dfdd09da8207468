"""`CausalLM` on tiny Llama and GPT-2 models: loss vs Hugging Face's own, every decoder tuner through the PEFT
callback, generation after training, merged export, exact resume, and the CLI recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.callbacks.adapter_checkpoint import META_KEY
from lightning_peft.export import export_merged
from lightning_peft.tasks import CausalLM, SFTData
from tests.tasks.helpers import TINY_CAUSAL


def _trainer(tmp_path: Path, callbacks: list, **kw: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    defaults.update(kw)
    return L.Trainer(callbacks=callbacks, **defaults)


def _model(family: str = "llama", seed: int = 0, **kw: Any) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(
        config=TINY_CAUSAL[family], learning_rate=1e-2, num_eval_generations=4, max_new_tokens=6, **kw
    )


def _data(files: tuple[Path, Path], **kw: Any) -> SFTData:
    return SFTData(str(files[0]), str(files[1]), tokenizer="bytes", batch_size=4, **kw)


def test_loss_equals_hugging_face_labels_loss(chat_files: tuple[Path, Path]) -> None:
    data = _data(chat_files)
    batch = next(iter(data.val_dataloader()))
    module = _model().eval()
    ours = module.training_step(batch, 0)
    theirs = module.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    torch.testing.assert_close(ours, theirs.loss)


TUNERS = {
    "lora": lambda fam: lp.LoRAConfig(
        r=4, alpha=8, target_modules=["q_proj", "v_proj"] if fam == "llama" else ["c_attn"]
    ),
    "prefix": lambda fam: lp.PrefixTuningConfig(num_virtual_tokens=3),
    "prompt": lambda fam: lp.PromptTuningConfig(num_virtual_tokens=3),
    "ptuning": lambda fam: lp.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
    "bottleneck": lambda fam: lp.BottleneckConfig(style="pfeiffer", bottleneck_size=8),
    "bitfit": lambda fam: lp.BitFitConfig(),
}
# Stacks (``PEFT([a, b])``): one tuner wrapping linears with a second that adds tokens, biases or modules.
TUNERS |= {
    "lora+prefix": lambda fam: [TUNERS["lora"](fam), TUNERS["prefix"](fam)],
    "lora+bitfit": lambda fam: [TUNERS["lora"](fam), TUNERS["bitfit"](fam)],
    "bottleneck+prompt": lambda fam: [TUNERS["bottleneck"](fam), TUNERS["prompt"](fam)],
}


class _Snapshot(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", sorted(TUNERS))
def test_every_decoder_tuner_trains_validates_and_generates(
    tmp_path: Path, chat_files: tuple[Path, Path], family: str, method: str
) -> None:
    if family == "llama" and "bitfit" in method:
        pytest.skip("Llama has no bias to train (BitFit needs biases); covered on GPT-2")
    module, snap = _model(family), _Snapshot()
    data = _data(chat_files)
    trainer = _trainer(tmp_path, [PEFT(TUNERS[method](family)), snap])
    trainer.fit(module, data)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, snap.before[n])}
    assert changed and changed == set(lp.trainable_state_dict(module))
    metrics = trainer.validate(module, data, verbose=False)[0]
    assert {"val/loss", "val/ppl", "val/token_acc", "val/exact_match", "val/token_f1"} <= set(metrics)
    assert metrics["val/ppl"] == pytest.approx(torch.tensor(metrics["val/loss"]).exp().item(), rel=1e-4)
    batch = next(iter(data.val_dataloader()))
    module.eval()
    answers = module.generate_answers(batch["prompt_ids"], batch["prompt_mask"], data.tokenizer)
    assert len(answers) == batch["prompt_ids"].shape[0] and all(isinstance(a, str) for a in answers)


def test_generation_with_cache_equals_full_recompute_after_prefix_training(
    tmp_path: Path, chat_files: tuple[Path, Path]
) -> None:
    module, data = _model(), _data(chat_files)
    _trainer(tmp_path, [PEFT(lp.PrefixTuningConfig(num_virtual_tokens=3))]).fit(module, data)
    batch = next(iter(data.val_dataloader()))
    module.eval()
    kw = dict(
        input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"], max_new_tokens=8, do_sample=False
    )
    kw.update(pad_token_id=256, eos_token_id=None)
    cached = module.model.generate(**kw, use_cache=True)
    full = module.model.generate(**kw, use_cache=False)
    assert torch.equal(cached, full)


def test_merged_export_loads_in_plain_transformers_and_matches(
    tmp_path: Path, chat_files: tuple[Path, Path]
) -> None:
    module, data = _model(), _data(chat_files)
    _trainer(tmp_path, [PEFT(TUNERS["lora"]("llama"))]).fit(module, data)
    export_merged(module, tmp_path / "merged", module="model")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in plain.state_dict())
    batch = next(iter(data.val_dataloader()))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            module(batch["input_ids"], batch["attention_mask"]),
            atol=1e-5,
            rtol=1e-4,
        )


class _StartStep(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = (
            trainer.global_step,
            trainer.current_epoch,
            trainer.fit_loop.epoch_loop.batch_progress.current.processed,
        )


class _KillAt(L.Callback):
    """Stops the fit after ``step`` optimizer steps, as a crash would (the schedule still targets 6 steps)."""

    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _run(
    tmp_path: Path, files: tuple[Path, Path], stop_at: int | None = None, ckpt_path: str | None = None
) -> tuple[CausalLM, _StartStep]:
    L.seed_everything(5)
    module, start = _model(), _StartStep()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=3)
    peft = PEFT(lp.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"]))
    callbacks = [peft, ckpt, start, _KillAt(stop_at)]
    _trainer(tmp_path, callbacks, max_steps=6, limit_val_batches=0).fit(
        module, _data(files), ckpt_path=ckpt_path
    )
    return module, start


def test_resume_mid_epoch_continues_where_it_stopped(tmp_path: Path, chat_files: tuple[Path, Path]) -> None:
    full, _ = _run(tmp_path / "a", chat_files)  # 16 examples / 4 = 4 batches per epoch
    _run(tmp_path / "b", chat_files, stop_at=3)
    last = tmp_path / "b" / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 3
    assert set(saved["state_dict"]) - {META_KEY} == set(lp.trainable_state_dict(full))  # adapter-only
    resumed, start = _run(tmp_path / "b", chat_files, ckpt_path=str(last))
    assert start.start == (3, 0, 3)  # global step, epoch, batches of the epoch already trained
    a, b = lp.trainable_state_dict(full), lp.trainable_state_dict(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_cli_tiny_recipe_prints_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from lightning_peft.cli import main

    recipe = Path(__file__).resolve().parents[2] / "configs" / "tiny_causal_lm_lora.yaml"
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(recipe), "--trainer.max_steps", "2"])
    out = capsys.readouterr().out
    assert "lightning-peft summary" in out and "val/ppl" in out and "val/exact_match" in out
    assert (tmp_path / "outputs" / "tiny_causal_lm_lora" / "checkpoints" / "summary.json").is_file()


def test_config_and_path_are_exclusive() -> None:
    with pytest.raises(ValueError, match="exactly one of model_name_or_path"):
        CausalLM()
    with pytest.raises(ValueError, match="model_type"):
        CausalLM(config={"hidden_size": 8})
