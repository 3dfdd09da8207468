"""`PromptClassifier`: prompt-based fine-tuning (PET / LM-BFF) of a masked or causal LM, with any tuner.

The task is written as a cloze or a continuation (``"{text} It was {mask}."``) and the pretrained LM head
scores the verbalizer's label words: no new classification head. Loss (PET, Schick & Schütze 2021):

    L = (1 - a) * CE(softmax(s), y) + a * L_MLM

``s`` the verbalizer's class scores, ``a = mlm_weight`` (the paper uses ``a = 1e-4``; PET's code writes the
same thing as ``0.9999 * CE + 1e-4 * MLM``, pet #30). ``L_MLM`` is BERT's masked-LM loss on the rendered
pattern: 15% of the ordinary tokens (never special tokens, the pattern's mask or soft tokens) are
selected; 80% of them become the mask token, 10% a random token, 10% stay. PET draws that MLM batch from
its unlabeled set; here it is the training batch's own inputs.

Distillation (PET's final step): a batch with soft ``targets`` ``(B, C)`` is trained on
``KL(softmax(t / T) || softmax(s / T)) * T^2`` (:func:`~lightning_peft.prompting.ensemble.distillation_loss`).

Tuners: add ``PEFT(LoRAConfig(target_modules=["query", "value"]))`` (``["q_proj", "v_proj"]`` on Llama),
``BitFitConfig()``, ``PromptTuningConfig(...)``, ...; with no callback every weight trains (full
fine-tuning). Soft tokens of the template train in every case and are kept in adapter-only checkpoints.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_peft.prompting.demonstrations import DemonstrationSampler, SentenceEmbedder
from lightning_peft.prompting.ensemble import distillation_loss
from lightning_peft.prompting.mlm import mask_tokens
from lightning_peft.prompting.models import lm_from_config, load_lm, load_lm_tokenizer
from lightning_peft.prompting.optim import adamw_with_schedule
from lightning_peft.prompting.scoring import PromptScorer
from lightning_peft.prompting.soft import SoftTokens
from lightning_peft.prompting.template import Template
from lightning_peft.prompting.tokens import lm_kind
from lightning_peft.prompting.verbalizer import Verbalizer

__all__ = ["PromptClassifier"]

#: Demonstration draws at inference are numbered from here (training uses the global step).
EVAL_DRAW = 2**30


class PromptClassifier(L.LightningModule):
    """Prompt-based classifier over an LM (``self.model``) through a template and a verbalizer.

    Example::

        model = PromptClassifier(
            template="{text} It was {answer}",
            verbalizer={"negative": ["terrible"], "positive": ["great"]},
            model_name_or_path="smollm2",
        )
        L.Trainer(max_epochs=10, callbacks=[PEFT(LoRAConfig(target_modules=["q_proj", "v_proj"]))]).fit(
            model, PromptData(shots_per_class=16))

    Args:
        template: The pattern (:class:`~lightning_peft.prompting.Template`): ``{mask}`` for masked LMs,
            ``{answer}`` at the end for causal LMs.
        verbalizer: Label name -> words, covering the data module's labels.
        model_name_or_path: Local model folder or a name ``resolve_pretrained_path`` knows.
        config: Build a random LM from ``{"model_type": ..., ...}`` instead (then ``tokenizer`` is needed).
        tokenizer: Tokenizer folder / name (default: the model's).
        aggregation: ``"pet"``, ``"mean_log_prob"`` or ``"log_mean_prob"`` (verbalizer module).
        length_normalize: Per-token mean of multi-token words' log-probabilities.
        fixed_slots: Template slots never truncated.
        max_length: Maximum tokens per rendered input.
        mlm_weight: ``a`` of the auxiliary MLM loss (0 = off; PET: 1e-4). Masked LMs only.
        mlm_probability: Share of tokens selected for the MLM loss.
        temperature: Distillation temperature ``T`` for batches with soft targets.
        train_base: ``False`` freezes the LM here (e.g. to train soft tokens alone).
        learning_rate: AdamW peak learning rate (PET / LM-BFF full fine-tuning: 1e-5; LoRA: ~1e-4 - 1e-3).
        weight_decay: AdamW weight decay for matrices.
        warmup_ratio: Linear warmup share of the steps, then linear decay to 0.
        soft_seed: Seed of the random init of ``{soft:n}`` tokens.
        demonstrations: LM-BFF demonstrations: ``0`` = off, else the number of demonstration sets averaged
            at inference (LM-BFF: 16); training draws a fresh set per example and step. The pool is the
            data module's (few-shot) training set, or :meth:`set_demonstration_pool`.
        demo_embedding: Sentence-embedding model ranking demonstrations by similarity (``"minilm"``), or
            ``None`` for uniform draws.
        demo_top_fraction: Share of each class's most similar candidates kept (LM-BFF: 0.5).
        demo_separator: Text between the input and each demonstration.
        lm: An LM object to use as it is (Python only; PET ensembles share one base this way).
    """

    def __init__(
        self,
        template: str,
        verbalizer: dict[str, list[str]],
        model_name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        aggregation: str = "pet",
        length_normalize: bool = False,
        fixed_slots: list[str] | None = None,
        max_length: int = 128,
        mlm_weight: float = 0.0,
        mlm_probability: float = 0.15,
        temperature: float = 2.0,
        train_base: bool = True,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.0,
        soft_seed: int = 0,
        demonstrations: int = 0,
        demo_embedding: str | None = "minilm",
        demo_top_fraction: float = 0.5,
        demo_separator: str = " ",
        lm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["lm"])
        if sum(x is not None for x in (config, model_name_or_path, lm)) != 1:
            raise ValueError(
                "give exactly one of model_name_or_path (pretrained), config (random init) or lm"
            )
        if model_name_or_path is None and tokenizer is None:
            raise ValueError("a model built from config (or passed as lm) needs tokenizer=<folder or name>")
        if not 0.0 <= mlm_weight < 1.0:
            raise ValueError(
                f"mlm_weight (PET's a in (1 - a) L_CE + a L_MLM) must be in [0, 1); got {mlm_weight}"
            )
        if demonstrations < 0:
            raise ValueError(f"demonstrations must be >= 0 (0 = off); got {demonstrations}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if lm is not None:
            self.model = lm
        else:
            built = lm_from_config(config) if config is not None else None
            self.model = built if built is not None else load_lm(model_name_or_path)  # type: ignore[arg-type]
        self.model.train()
        if tokenizer is None or isinstance(tokenizer, str):
            self.tokenizer = load_lm_tokenizer(tokenizer or model_name_or_path)
        else:  # a tokenizer object (Python use)
            self.tokenizer = tokenizer
        kind = lm_kind(self.model)
        if mlm_weight > 0 and kind != "masked":
            raise ValueError("the auxiliary MLM loss (mlm_weight > 0) needs a masked LM; set mlm_weight: 0")
        tmpl = Template(template, fixed=fixed_slots or ())
        self.scorer = PromptScorer(
            tmpl,
            Verbalizer(verbalizer, aggregation, length_normalize),
            self.tokenizer,
            kind,  # type: ignore[arg-type]
        )
        self.soft = (
            SoftTokens(tmpl, self.tokenizer, self.model.get_input_embeddings(), seed=soft_seed)
            if tmpl.soft_parts
            else None
        )
        if not train_base:
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.sampler: DemonstrationSampler | None = None
        n = self.scorer.num_labels
        self.val_acc, self.val_f1 = MulticlassAccuracy(n), MulticlassF1Score(n, average="macro")
        self.test_acc, self.test_f1 = MulticlassAccuracy(n), MulticlassF1Score(n, average="macro")

    @property
    def label_names(self) -> list[str]:
        return list(self.scorer.verbalizer.labels)

    def setup(self, stage: str) -> None:
        """Check that the data module's labels are the verbalizer's, in the same order."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "label_names", None)
        if names is not None and list(names) != self.label_names:
            raise ValueError(
                f"the data's labels {list(names)} differ from the verbalizer's {self.label_names}: give the "
                "verbalizer one entry per label, in the data's label order (or set the data's label_names)"
            )
        if self.hparams.demonstrations and self.sampler is None:
            pool = getattr(datamodule, "train_examples", None)
            if pool is None:
                raise ValueError(
                    "demonstrations need a pool: use PromptData or call set_demonstration_pool()"
                )
            self.set_demonstration_pool(pool())

    def set_demonstration_pool(self, examples: list[dict[str, Any]]) -> None:
        """Labeled examples (``{"slots", "label", "index"}``) that demonstrations are drawn from."""
        name = self.hparams.demo_embedding
        words = [self.scorer.verbalizer.words[label][0] for label in self.label_names]
        self.sampler = DemonstrationSampler(
            examples,
            words,
            embed=SentenceEmbedder(name) if name else None,
            top_fraction=self.hparams.demo_top_fraction,
            seed=self.hparams.soft_seed,
        )

    # -- batches ---------------------------------------------------------------------------------------
    def encode_examples(
        self, examples: list[dict[str, Any]], demos: list[list[tuple[dict[str, Any], str]]] | None = None
    ) -> dict[str, Any]:
        """Render and collate raw slot dicts (with per-example demonstrations) into a prompt batch (CPU)."""
        hp = self.hparams
        features = [
            self.scorer.encode(ex, hp.max_length, demos[i] if demos else (), hp.demo_separator)
            for i, ex in enumerate(examples)
        ]
        return self.scorer.collate(features)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Raw batches from :class:`~lightning_peft.tasks.prompt_data.PromptData` are tokenized here."""
        if isinstance(batch, dict) and "examples" in batch:
            batch = dict(batch)
            slots = batch.pop("examples")
            if self.hparams.demonstrations:
                if self.sampler is None:
                    raise RuntimeError("demonstrations are on but no pool was set (set_demonstration_pool)")
                index = batch["index"].tolist()
                exs = [{"slots": s, "index": i} for s, i in zip(slots, index, strict=True)]
                if self.training:  # a fresh draw per example and step: resumes identically
                    draw = self.trainer.global_step + 1 if self._trainer is not None else 1
                    batch["prompt"] = self.encode_examples(
                        slots, [self.sampler.sample(e, draw, exclude_self=True) for e in exs]
                    )
                else:
                    batch["prompt_sets"] = [
                        self.encode_examples(slots, [self.sampler.sample(e, EVAL_DRAW + d) for e in exs])
                        for d in range(self.hparams.demonstrations)
                    ]
                    batch["prompt"] = batch["prompt_sets"][0]
            else:
                batch["prompt"] = self.encode_examples(slots)
            if self.training and self.hparams.mlm_weight > 0:
                batch["mlm"] = self._mlm_batch(batch["prompt"])
        return batch

    def _mlm_batch(self, prompt: dict[str, Any]) -> dict[str, torch.Tensor]:
        part = prompt[min(prompt, key=lambda k: int(k.split("_")[1]))]  # the rendering with the fewest masks
        ids, labels = mask_tokens(
            part["input_ids"],
            part["attention_mask"],
            tokenizer=self.tokenizer,
            probability=self.hparams.mlm_probability,
            keep=part["soft_index"] >= 0,
            generator=torch.Generator().manual_seed(self._mlm_seed()),
        )
        return {"input_ids": ids, "attention_mask": part["attention_mask"], "labels": labels}

    def _mlm_seed(self) -> int:
        """The MLM corruption of step ``k`` is drawn from seed ``(soft_seed, k)``: a resumed run masks the
        same tokens as an uninterrupted one whatever else consumed the global RNG."""
        step = self.trainer.global_step if self._trainer is not None else 0
        return (int(self.hparams.soft_seed) * 1_000_003 + step) % 2**63

    # -- forward and losses ----------------------------------------------------------------------------
    def forward(self, prompt: dict[str, Any]) -> torch.Tensor:
        """``(B, C)`` class scores of a prompt batch."""
        return self.scorer(self.model, prompt, self.soft)

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self(batch["prompt"])
        if "targets" in batch:
            loss = distillation_loss(scores, batch["targets"], self.hparams.temperature)
        else:
            loss = F.cross_entropy(scores, batch["labels"])
        return scores, loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """PET's loss ``(1 - a) CE + a MLM``, logged as ``train/loss`` (and ``train/mlm``)."""
        _, loss = self._loss(batch)
        a = self.hparams.mlm_weight
        if a > 0:
            mlm = batch["mlm"]
            logits = self.model(input_ids=mlm["input_ids"], attention_mask=mlm["attention_mask"]).logits
            labels = mlm["labels"]
            if logits.shape[1] > labels.shape[1]:  # virtual tokens prepended by prompt tuning
                labels = F.pad(labels, (logits.shape[1] - labels.shape[1], 0), value=-100)
            mlm_loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
            self.log("train/mlm", mlm_loss, batch_size=labels.shape[0])
            loss = (1 - a) * loss + a * mlm_loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc, self.val_f1)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc, self.test_f1)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """``(B, C)`` class scores (log-probabilities averaged over demonstration sets when on)."""
        return self.eval_scores(batch)

    def eval_scores(self, batch: dict[str, Any]) -> torch.Tensor:
        """Class scores of a batch; with demonstrations, the mean log-softmax over the sets (LM-BFF)."""
        if "prompt_sets" in batch:
            return torch.stack([self(p).log_softmax(-1) for p in batch["prompt_sets"]]).mean(0)
        return self(batch["prompt"])

    def _evaluate(
        self, batch: dict[str, Any], split: str, acc: MulticlassAccuracy, f1: MulticlassF1Score
    ) -> None:
        scores = self.eval_scores(batch)
        loss = F.cross_entropy(scores, batch["labels"])
        preds, size = scores.argmax(-1), batch["labels"].shape[0]
        acc.update(preds, batch["labels"])
        f1.update(preds, batch["labels"])
        self.log(f"{split}/loss", loss, batch_size=size, sync_dist=True)
        self.log(f"{split}/acc", acc, prog_bar=split == "val", batch_size=size)
        self.log(f"{split}/f1", f1, batch_size=size)

    def configure_optimizers(self) -> Any:
        """AdamW over the parameters trainable now + linear warmup / decay per step."""
        hp = self.hparams
        return adamw_with_schedule(self, hp.learning_rate, hp.weight_decay, hp.warmup_ratio)
