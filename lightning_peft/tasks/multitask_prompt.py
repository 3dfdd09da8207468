"""T0-style multi-task prompted training (Sanh et al. 2022) and zero-shot evaluation on held-out tasks.

Every task has a template ending in ``{answer}`` and answer choices (:class:`~lightning_peft.prompting.rank.
TaskPrompt`). Training mixes the tasks' examples (examples-proportional mixing) and maximises the
likelihood of the correct answer's tokens (token-mean NLL, as T0's teacher-forced LM loss); evaluation
ranks each example's choices by whole-answer log-likelihood (:func:`~lightning_peft.prompting.rank.
rank_classify`), per task: ``val/<task>/acc`` and ``val/acc`` (their mean). Tasks named in
``held_out`` are never trained on: their accuracy is zero-shot task generalisation.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_peft.prompting.models import lm_from_config, load_lm, load_lm_tokenizer
from lightning_peft.prompting.optim import adamw_with_schedule
from lightning_peft.prompting.rank import TaskPrompt, answer_loglik, choice_scores
from lightning_peft.prompting.tokens import encode_piece, lm_kind
from lightning_peft.tasks.data import read_records

__all__ = ["MultiTaskPromptData", "MultiTaskPromptLM"]

Example = dict[str, Any]


class MultiTaskPromptLM(L.LightningModule):
    """A causal LM trained on several prompted tasks, evaluated by rank classification.

    Args:
        tasks: ``[{"name", "template", "choices"}]`` (``choices`` may be omitted when examples carry them).
        model_name_or_path: Causal LM folder / name (or ``config`` + ``tokenizer``).
        config: Random-init LM config.
        tokenizer: Tokenizer folder / name / object.
        length_normalize: Rank by per-token mean log-likelihood instead of the sum.
        learning_rate: AdamW peak learning rate.
        weight_decay: AdamW weight decay of matrices.
        warmup_ratio: Linear warmup share.
        lm: An LM object to use as it is (Python only).
    """

    def __init__(
        self,
        tasks: list[dict[str, Any]],
        model_name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        tokenizer: Any = None,
        length_normalize: bool = False,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.0,
        lm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["lm", "tokenizer"])
        if sum(x is not None for x in (config, model_name_or_path, lm)) != 1:
            raise ValueError("give exactly one of model_name_or_path, config or lm")
        self.tasks = {t["name"]: TaskPrompt(**t) for t in tasks}
        if len(self.tasks) != len(tasks):
            raise ValueError(f"task names must be unique; got {[t['name'] for t in tasks]}")
        built = lm if lm is not None else (lm_from_config(config) if config is not None else None)
        self.model = built if built is not None else load_lm(model_name_or_path)  # type: ignore[arg-type]
        if lm_kind(self.model) != "causal":
            raise ValueError("multi-task rank classification needs a causal LM (GPT-2 / Llama families)")
        is_object = tokenizer is not None and not isinstance(tokenizer, str)
        self.tokenizer = tokenizer if is_object else load_lm_tokenizer(tokenizer or model_name_or_path)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Token-mean NLL of every example's correct answer, logged as ``train/loss``."""
        loss = self.answer_nll(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def answer_nll(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean over the batch of the correct answer's token-mean negative log-likelihood."""
        prompts, answers = [], []
        for name, ex, label in zip(batch["task"], batch["examples"], batch["labels"].tolist(), strict=True):
            task = self.tasks[name]
            space = task.pattern.parts[-1].space
            answer = encode_piece(self.tokenizer, (" " if space else "") + task.choices_for(ex)[label])
            enc = task.pattern.encode(ex["slots"], self.tokenizer, kind="causal", reserve=len(answer))
            prompts.append(enc.input_ids)
            answers.append(answer)
        loglik = answer_loglik(self.model, self.tokenizer, prompts, answers)
        lengths = torch.tensor([len(a) for a in answers], device=loglik.device)
        return -(loglik / lengths).mean()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Rank-classification accuracy of the batch's task (one task per validation loader)."""
        name = batch["task"][0]
        scores = choice_scores(
            self.model, self.tokenizer, self.tasks[name], batch["examples"], self.hparams.length_normalize
        )
        preds = torch.tensor([int(s.argmax()) for s in scores])
        acc = (preds == batch["labels"].cpu()).float().mean()
        self.log(f"val/{name}/acc", acc, batch_size=len(preds), add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        accs = [
            v for k, v in self.trainer.callback_metrics.items() if k.startswith("val/") and k.endswith("/acc")
        ]
        if accs:
            self.log("val/acc", torch.stack([a.float() for a in accs]).mean())

    def configure_optimizers(self) -> Any:
        return adamw_with_schedule(
            self, self.hparams.learning_rate, self.hparams.weight_decay, self.hparams.warmup_ratio
        )


class MultiTaskPromptData(L.LightningDataModule):
    """Several tasks' files: a mixed training loader and one validation loader per task.

    Args:
        tasks: ``[{"name", "train_path", "val_path", "slots": {slot: column}, "label_column",
            "label_names", "choices_column"}]``; tasks in ``held_out`` need only ``val_path``.
        held_out: Task names evaluated but never trained on.
        batch_size: Examples per batch.
        seed: Seed of the training order.
    """

    def __init__(
        self,
        tasks: list[dict[str, Any]],
        held_out: list[str] | None = None,
        batch_size: int = 8,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.held_out = set(held_out or [])
        unknown = self.held_out - {t["name"] for t in tasks}
        if unknown:
            raise ValueError(f"held_out names unknown tasks {sorted(unknown)}")
        self.batch_size, self.seed = batch_size, seed

    def _rows(self, task: dict[str, Any], split: str) -> list[Example]:
        records = read_records(task[f"{split}_path"])
        names = task.get("label_names")
        slots = task.get("slots", {"text": "text"})
        out = []
        for r in records:
            raw = r[task.get("label_column", "label")]
            label = names.index(str(raw)) if names else int(raw)
            ex: Example = {
                "task": task["name"],
                "slots": {s: str(r[c]) for s, c in slots.items()},
                "label": label,
            }
            if task.get("choices_column"):
                ex["choices"] = list(r[task["choices_column"]])
            out.append({"task": task["name"], "example": ex, "label": label})
        return out

    def train_dataloader(self) -> DataLoader:
        rows = [row for t in self.tasks if t["name"] not in self.held_out for row in self._rows(t, "train")]
        if not rows:
            raise ValueError("no training task: every task is held out")
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(rows, batch_size=self.batch_size, shuffle=True, generator=g, collate_fn=_collate)

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(self._rows(t, "val"), batch_size=self.batch_size, collate_fn=_collate)
            for t in self.tasks
            if t.get("val_path")
        ]


def _collate(rows: list[Example]) -> dict[str, Any]:
    return {
        "task": [r["task"] for r in rows],
        "examples": [r["example"] for r in rows],
        "labels": torch.tensor([r["label"] for r in rows], dtype=torch.long),
    }
