"""`CausalLM`: supervised fine-tuning of a decoder-only language model (SmolLM2, Llama, GPT-2, ...)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from lightning_peft.tasks.lm_metrics import AnswerScores, TokenStats, shifted_token_loss
from lightning_peft.tasks.optim import adamw_linear_warmup
from lightning_peft.tasks.pretrained import _quiet_transformers, resolve_pretrained_path

__all__ = ["CausalLM"]


class CausalLM(L.LightningModule):
    """A Hugging Face ``AutoModelForCausalLM`` (``self.model``) trained on next-token loss of labelled tokens.

    Batches come from `lightning_peft.tasks.SFTData`: ``labels`` are ``-100`` on prompt tokens, so the loss is
    the response's alone (InstructGPT's SFT, Ouyang et al., 2022). Validation logs the token-weighted
    ``val/loss``, ``val/ppl`` and ``val/token_acc``, then greedily generates answers to the first
    ``num_eval_generations`` validation prompts and logs ``val/exact_match`` and ``val/token_f1`` against the
    references; ``num_samples`` of them are printed and sent to loggers with ``log_text`` (W&B).

    Tuner targets are the model's own module names: ``q_proj`` / ``v_proj`` for Llama-family models,
    ``c_attn`` for GPT-2. Prompt and P-tuning prepend virtual tokens to the model's output; the loss reads
    the last ``T`` positions, which are the real tokens'.

    Example::

        data = SFTData(tokenizer="smollm2")
        model = CausalLM("smollm2", learning_rate=2e-3)
        peft = PEFT(LoRAConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
        L.Trainer(max_steps=200, callbacks=[peft]).fit(model, data)

        tiny = CausalLM(config={"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 260})

    Args:
        model_name_or_path: ``"smollm2"`` (bundled SmolLM2-135M-Instruct) or a local ``save_pretrained``
            folder. Nothing is downloaded. Must be ``None`` when ``config`` is given.
        config: Build a random model from ``{"model_type": ..., <config fields>}`` instead.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay of matrices.
        warmup_ratio: Share of the steps spent warming up linearly, then decaying linearly to 0.
        num_eval_generations: Validation prompts answered by greedy generation per validation run (0: none).
        max_new_tokens: Token budget of each generated answer.
        num_samples: Generated answers printed / logged per validation run.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
        num_eval_generations: int = 64,
        max_new_tokens: int = 32,
        num_samples: int = 3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if (config is None) == (model_name_or_path is None):
            raise ValueError("give exactly one of model_name_or_path (pretrained) or config (random init)")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1); got {warmup_ratio}")
        if num_eval_generations < 0 or max_new_tokens < 1 or num_samples < 0:
            raise ValueError("need num_eval_generations >= 0, max_new_tokens >= 1 and num_samples >= 0")
        if config is not None:
            fields = dict(config)
            model_type = fields.pop("model_type", None)
            if not model_type:
                raise ValueError(f"config needs a 'model_type' (e.g. 'llama'); got keys {sorted(config)}")
            self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))
        else:
            with _quiet_transformers():
                self.model = AutoModelForCausalLM.from_pretrained(resolve_pretrained_path(model_name_or_path))
            self.model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as they are
        self.val_tokens = TokenStats()
        self.val_answers = AnswerScores()
        self.samples: list[dict[str, str]] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``(B, T, V)`` of the ``T`` real tokens (virtual prompt tokens cut off)."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[:, -input_ids.shape[1] :]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Mean next-token loss over the batch's labelled tokens, logged as ``train/loss``."""
        loss, correct = shifted_token_loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        if loss.numel() == 0:
            raise ValueError("a training batch has no labelled token; check the data's response fields")
        mean = loss.mean()
        size = batch["input_ids"].shape[0]
        self.log("train/loss", mean, prog_bar=True, batch_size=size)
        self.log("train/token_acc", correct.float().mean(), batch_size=size)
        return mean

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Accumulate token loss / accuracy; answer the batch's prompts while the generation budget lasts."""
        loss, correct = shifted_token_loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.val_tokens.update(loss, correct)
        budget = self.hparams.num_eval_generations - int(self.val_answers.count.item())
        tokenizer = self._tokenizer()
        if budget > 0 and tokenizer is not None and not self.trainer.sanity_checking:
            keep = slice(0, budget)
            answers = self.generate_answers(batch["prompt_ids"][keep], batch["prompt_mask"][keep], tokenizer)
            references = batch["references"][keep]
            self.val_answers.update(answers, references)
            prompts = tokenizer.batch_decode(batch["prompt_ids"][keep], skip_special_tokens=True)
            for prompt, answer, ref in zip(prompts, answers, references, strict=True):
                if len(self.samples) < self.hparams.num_samples:
                    self.samples.append(
                        {"prompt": prompt.strip()[-300:], "generated": answer, "reference": ref}
                    )

    def on_validation_epoch_end(self) -> None:
        """Log ``val/loss``, ``val/ppl``, ``val/token_acc`` (+ ``val/exact_match``, ``val/token_f1``)."""
        stats = self.val_tokens.compute()
        self.log_dict({f"val/{k}": v for k, v in stats.items()}, prog_bar=True)
        self.val_tokens.reset()
        if int(self.val_answers.count.item()) > 0:
            self.log_dict({f"val/{k}": v for k, v in self.val_answers.compute().items()})
        self.val_answers.reset()
        self._report_samples()

    def _report_samples(self) -> None:
        samples, self.samples = self.samples, []
        if not samples or self.trainer.sanity_checking:
            return
        lines = [f"sample generations (step {self.global_step}):"]
        for s in samples:
            lines.append(
                f"  prompt   : ...{s['prompt'][-120:]!r}\n  generated: {s['generated']!r}\n"
                f"  reference: {s['reference']!r}"
            )
        rank_zero_info("\n".join(lines))
        for logger in self.loggers:
            if hasattr(logger, "log_text"):
                rows = [[self.global_step, s["prompt"], s["generated"], s["reference"]] for s in samples]
                logger.log_text(
                    key="val/samples", columns=["step", "prompt", "generated", "reference"], data=rows
                )

    @torch.no_grad()
    def generate_answers(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, tokenizer: PreTrainedTokenizerBase
    ) -> list[str]:
        """Greedy answers to left-padded prompts ``(B, P)``, decoded without special tokens."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = self.model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=self.hparams.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )  # (B, P + new)
        return [
            text.strip()
            for text in tokenizer.batch_decode(out[:, prompt_ids.shape[1] :], skip_special_tokens=True)
        ]

    def _tokenizer(self) -> PreTrainedTokenizerBase | None:
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        return getattr(datamodule, "tokenizer", None)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """AdamW over the parameters trainable now + linear warmup/decay (`adamw_linear_warmup`)."""
        return adamw_linear_warmup(
            self,
            self.hparams.learning_rate,
            self.hparams.weight_decay,
            self.hparams.warmup_ratio,
            self.trainer.estimated_stepping_batches,
        )
