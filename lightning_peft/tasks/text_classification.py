"""`TextClassifier`: a sequence classifier (pooled encoder + linear head) for any Hugging Face encoder."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_peft.early_exit import predict as exit_predict
from lightning_peft.tasks.exits import (
    ExitTimer,
    check_num_labels,
    exit_eval,
    exit_heads_of,
    exit_train_loss,
    final_exit_logits,
)
from lightning_peft.tasks.optim import adamw_linear_warmup
from lightning_peft.tasks.pretrained import encoder_from_config, load_encoder, resolve_pretrained_path

Pooling = Literal["auto", "cls", "mean", "last"]


def _split_metrics(num_labels: int) -> nn.ModuleDict:
    """The epoch-level metrics of one split, keyed by the name they are logged under (``val/<name>``).

    ``acc`` is accuracy, the fraction of correct predictions (``average="micro"``). ``balanced_acc`` is
    balanced accuracy (Brodersen et al. 2010), the mean of the per-class recalls (``average="macro"``).
    ``f1`` is macro F1.
    """
    return nn.ModuleDict(
        {
            "acc": MulticlassAccuracy(num_labels, average="micro"),
            "balanced_acc": MulticlassAccuracy(num_labels, average="macro"),
            "f1": MulticlassF1Score(num_labels, average="macro"),
        }
    )


def _causal_pooling(backbone: nn.Module) -> str:
    """``"last"`` for a decoder-only backbone (every block stack causal, from the layout registry; else the
    config's ``is_decoder``), ``"mean"`` otherwise (encoders, encoder-decoders)."""
    from lightning_peft.layouts import find_stacks

    try:
        stacks = find_stacks(backbone)
        causal = bool(stacks) and all(stack.causal for stack in stacks)
    except ValueError:  # a family without a registered layout
        causal = bool(getattr(backbone.config, "is_decoder", False))
    return "last" if causal else "mean"


class TextClassifier(L.LightningModule):
    """Encoder (``self.backbone``) -> pooling -> dropout -> linear head (``self.classifier``).

    The backbone is built in ``__init__`` (not ``configure_model``): it is small enough to materialise on
    every rank, and a tuner callback then sees the final module tree in its ``setup``. Targets for tuners are
    the backbone's module names (``"query"``, ``"value"``, ...) and ``"classifier"`` for the head, e.g.
    ``LoRAConfig(target_modules=["query", "value"], modules_to_save=["classifier"])``.

    ``configure_optimizers`` only optimises parameters with ``requires_grad=True`` when it runs, so it follows
    whatever a PEFT callback froze in ``setup``. Biases and norm weights (1-D tensors) get no weight decay.

    Example::

        from lightning_peft.tasks import TextClassificationData, TextClassifier

        data = TextClassificationData(batch_size=32)  # bundled demo sentiment task
        model = TextClassifier(num_labels=data.num_labels, pooling="mean", learning_rate=1e-3)
        peft = PEFT(LoRAConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
        L.Trainer(max_epochs=3, callbacks=[peft]).fit(model, data)

        # tiny random model: pair with TextClassificationData(tokenizer="whitespace", vocab_size=256)
        tiny = TextClassifier(config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
                                      "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 256})

    Early exit: with exit heads on the backbone (``PEFT(EarlyExitConfig(...))``, alone or last in a tuner
    list) the exits replace ``classifier``: training uses the config's multi-exit loss, ``val/acc`` is the
    accuracy of the dynamic prediction (each sample at its own exit), and every exit's accuracy, the average
    exit layer, the fraction of layers run and the wall-clock speed-up over the full model are logged
    (:mod:`lightning_peft.tasks.exits`); ``predict_step`` exits early per sample.

    Args:
        model_name_or_path: A local model folder (``save_pretrained`` output), or ``"minilm"`` / ``None`` for
            the bundled all-MiniLM-L6-v2. Nothing is downloaded. Must be ``None`` when ``config`` is given.
        config: Build a randomly initialised encoder from ``{"model_type": ..., <config fields>}`` instead.
        num_labels: Number of classes (>= 2).
        learning_rate: Peak learning rate of AdamW. The default suits adapters / LoRA; full fine-tuning wants
            about ``2e-5``.
        weight_decay: AdamW weight decay for matrices (biases and norm weights get none).
        warmup_ratio: Share of the total steps spent warming up linearly from 0, then decaying linearly to 0.
        pooling: ``"mean"`` (mask-aware average of token states; right for sentence-embedding models such as
            MiniLM), ``"cls"`` (the first token's state), ``"last"`` (the last real token's state: in a causal
            decoder the only one that has seen the whole input, as Hugging Face's GPT-2 / Llama
            ``*ForSequenceClassification`` pool), or ``"auto"`` (default): ``"last"`` when the backbone's
            self-attention is causal (GPT-2, Llama, Mistral, Qwen2, ...), ``"mean"`` otherwise. Mean pooling
            over a pretrained decoder's states is dominated by the first tokens' very large activations and
            leaves a new head near chance.
        dropout: Dropout on the pooled vector before the head.
        exit_timing: With exit heads, time the full and the dynamic model on every evaluation batch and
            log the speed-up (two extra passes per batch).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        num_labels: int = 2,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        pooling: Pooling = "auto",
        dropout: float = 0.1,
        exit_timing: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if pooling not in ("auto", "cls", "mean", "last"):
            raise ValueError(f"pooling must be 'auto', 'cls', 'mean' or 'last'; got {pooling!r}")
        if num_labels < 2:
            raise ValueError(f"num_labels must be >= 2; got {num_labels}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1); got {warmup_ratio}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        if config is not None and model_name_or_path is not None:
            raise ValueError("give either model_name_or_path (pretrained) or config (random init), not both")
        if config is not None:
            self.backbone = encoder_from_config(config)
        else:
            self.backbone = load_encoder(resolve_pretrained_path(model_name_or_path))
            # `from_pretrained` returns eval mode, and Lightning >= 2.2 keeps module modes as they are, so the
            # backbone's dropout would silently stay off during training.
            self.backbone.train()
        self.pooling = _causal_pooling(self.backbone) if pooling == "auto" else pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.backbone.config.hidden_size, num_labels)
        # Accuracy is the fraction of correct predictions (micro). torchmetrics' default, "macro", is the
        # mean per-class recall, i.e. balanced accuracy: logged under that name, apart.
        self.val_metrics = _split_metrics(num_labels)
        self.test_metrics = _split_metrics(num_labels)
        self._exit_timer: ExitTimer | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Class logits.

        Args:
            input_ids: ``(B, T)`` token ids.
            attention_mask: ``(B, T)``, 1 for tokens and 0 for padding.
            token_type_ids: ``(B, T)`` segment ids, for models that use them.

        Returns:
            ``(B, num_labels)`` logits; with exit heads, the final exit's (the model run in full).
        """
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if exit_heads_of(self.backbone) is not None:
            return final_exit_logits(
                self.backbone, input_ids=input_ids, attention_mask=attention_mask, **kwargs
            )
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return self.classifier(self.dropout(self.pool(hidden, attention_mask)))  # (B, C)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` token states -> ``(B, H)`` by CLS, mask-aware mean or last-real-token pooling."""
        if self.pooling == "cls":
            return hidden[:, 0]
        extra = hidden.shape[1] - attention_mask.shape[1]
        if extra > 0:  # prompt / P-tuning prepend virtual tokens: they count as real tokens
            attention_mask = torch.cat(
                [attention_mask.new_ones(attention_mask.shape[0], extra), attention_mask], 1
            )
        if self.pooling == "last":  # the last position whose mask is 1 (right or left padding alike)
            T = attention_mask.shape[1]
            last = T - 1 - attention_mask.flip(1).to(torch.long).argmax(1)  # (B,)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def _logits_and_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        return logits, F.cross_entropy(logits, batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy on one batch, logged as ``train/loss``."""
        heads = exit_heads_of(self.backbone)
        if heads is not None:
            check_num_labels(heads, self.hparams.num_labels)
            loss = exit_train_loss(self.backbone, batch, self.global_step)
        else:
            _, loss = self._logits_and_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["labels"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Log ``val/loss``, ``val/acc``, ``val/balanced_acc`` and macro ``val/f1`` (epoch-level)."""
        self._evaluate(batch, "val", self.val_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Log ``test/loss``, ``test/acc``, ``test/balanced_acc`` and macro ``test/f1`` (epoch-level)."""
        self._evaluate(batch, "test", self.test_metrics)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Predicted class ids ``(B,)`` (with exit heads: each sample at its own exit)."""
        if exit_heads_of(self.backbone) is not None:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            return exit_predict(self.backbone, **inputs)[0].argmax(-1)
        return self(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).argmax(-1)

    def _evaluate(self, batch: dict[str, torch.Tensor], split: str, metrics: nn.ModuleDict) -> None:
        heads, size = exit_heads_of(self.backbone), batch["labels"].shape[0]
        if heads is not None:
            check_num_labels(heads, self.hparams.num_labels)
            if self._exit_timer is None and self.hparams.exit_timing:
                self._exit_timer = ExitTimer()
            loss, logits, exit_metrics = exit_eval(self.backbone, heads, batch, self._exit_timer)
            for name, value in exit_metrics.items():
                self.log(f"{split}/{name}", value, batch_size=size, sync_dist=True)
        else:
            logits, loss = self._logits_and_loss(batch)
        preds = logits.argmax(-1)  # (B,)
        self.log(f"{split}/loss", loss, batch_size=size, sync_dist=True)
        for name, metric in metrics.items():
            metric.update(preds, batch["labels"])
            self.log(f"{split}/{name}", metric, prog_bar=split == "val" and name == "acc", batch_size=size)

    def on_validation_epoch_end(self) -> None:
        """With exit heads and ``exit_timing``: log the epoch's wall-clock speed-up over the full model."""
        self._log_exit_timing("val")

    def on_test_epoch_end(self) -> None:
        """As :meth:`on_validation_epoch_end`, for ``test/``."""
        self._log_exit_timing("test")

    def _log_exit_timing(self, split: str) -> None:
        timer, self._exit_timer = self._exit_timer, None
        if timer is not None:
            self.log(f"{split}/speedup", timer.speedup())
            self.log(f"{split}/time_full_s", timer.full)
            self.log(f"{split}/time_dynamic_s", timer.dynamic)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """AdamW over the parameters trainable *now* + linear warmup/decay stepped every optimizer step.

        Raises:
            RuntimeError: Nothing is trainable.
        """
        return adamw_linear_warmup(
            self,
            self.hparams.learning_rate,
            self.hparams.weight_decay,
            self.hparams.warmup_ratio,
            self.trainer.estimated_stepping_batches,
        )
