"""The demo's headline and its two reference points, at equal epochs, from one script.

``make demo`` trains LoRA (``configs/minilm_lora.yaml``) on the bundled sentiment task. Next to it this script
measures what the README compares it with, on the same data, tokenizer, pooling, batch size, seed and number
of epochs (all read from the recipe, so they cannot drift apart):

* ``lora``: the recipe itself (LoRA r=8 on query/value + the head), validation accuracy before and after;
* ``full_finetuning``: the same ``TextClassifier`` with every parameter trained (no PEFT callback) at a full
  fine-tuning learning rate (``--full-lr``, 5e-5 by default; the recipe's 2e-3 is a LoRA rate);
* ``logistic_regression``: scikit-learn's ``LogisticRegression`` on frozen, mean-pooled MiniLM embeddings
  of the training split (the "probe": what the pretrained encoder gives without adapting it).

Run::

    .venv/bin/python benchmarks/demo_baselines.py            # ~3 trainings of 3 epochs on 2 CPU cores
    .venv/bin/python benchmarks/demo_baselines.py --quick    # smoke run: tiny random model, a few batches
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_quick_flag, apply_quick, machine_info, print_table, quick, write_json

from lightning_peft import LoRAConfig
from lightning_peft.callbacks import PEFT
from lightning_peft.tasks import TextClassificationData, TextClassifier

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "minilm_lora.yaml"
TINY = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY |= {"intermediate_size": 64, "vocab_size": 256}


def read_recipe(path: Path) -> dict[str, Any]:
    """The demo recipe's seed, epochs, model, data and LoRA settings."""
    recipe = yaml.safe_load(path.read_text())
    (peft,) = [cb for cb in recipe["trainer"]["callbacks"] if cb["class_path"].endswith("PEFT")]
    return {
        "seed": recipe["seed_everything"],
        "max_epochs": recipe["trainer"]["max_epochs"],
        "model": recipe["model"]["init_args"],
        "data": recipe["data"]["init_args"],
        "lora": peft["init_args"]["config"]["init_args"],
    }


def build(recipe: dict[str, Any], **model_overrides: Any) -> tuple[TextClassifier, TextClassificationData]:
    """The recipe's module and data (a tiny random encoder and whitespace tokenizer under ``--quick``)."""
    L.seed_everything(recipe["seed"])
    model_args, data_args = {**recipe["model"], **model_overrides}, dict(recipe["data"])
    if quick():
        model_args = {**model_args, "model_name_or_path": None, "config": TINY}
        data_args = {
            **data_args,
            "tokenizer": "whitespace",
            "vocab_size": TINY["vocab_size"],
            "max_length": 16,
        }
    return TextClassifier(**model_args), TextClassificationData(**data_args)


def trainer(epochs: int, callbacks: list[L.Callback], root: Path) -> L.Trainer:
    limits = {"limit_train_batches": 2, "limit_val_batches": 2} if quick() else {}
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=callbacks,
        **limits,
    )


def validate(fit: L.Trainer, model: TextClassifier, data: TextClassificationData) -> dict[str, float]:
    (metrics,) = fit.validate(model, data, verbose=False)
    return {"accuracy": float(metrics["val/acc"]), "macro_f1": float(metrics["val/f1"])}


def train(recipe: dict[str, Any], root: Path, lora: bool, lr: float | None) -> dict[str, Any]:
    """Fit the recipe's module for the recipe's epochs, with LoRA or fully; validation before and after."""
    model, data = build(recipe, **({"learning_rate": lr} if lr else {}))
    callbacks: list[L.Callback] = [PEFT(LoRAConfig(**recipe["lora"]))] if lora else []
    fit = trainer(recipe["max_epochs"], callbacks, root)
    before = validate(trainer(recipe["max_epochs"], [], root), model, data)
    start = time.perf_counter()
    fit.fit(model, data)
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "before": before,
        "after": validate(fit, model, data),
        "epochs": recipe["max_epochs"],
        "learning_rate": model.hparams.learning_rate,
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "fit_seconds": seconds,
    }


@torch.no_grad()
def embeddings(model: TextClassifier, loader: Any, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pooled frozen encoder states ``(N, H)`` and labels ``(N,)`` of a loader's batches."""
    feats, labels = [], []
    model.eval()
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        hidden = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        feats.append(model.pool(hidden.last_hidden_state, batch["attention_mask"]))
        labels.append(batch["labels"])
    return torch.cat(feats), torch.cat(labels)


def probe(recipe: dict[str, Any], c: float) -> dict[str, Any]:
    """Logistic regression on frozen, mean-pooled encoder embeddings: train split -> validation split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    model, data = build(recipe)
    data.setup("fit")
    limit = 2 if quick() else None
    x_train, y_train = embeddings(model, data.train_dataloader(), limit)
    x_val, y_val = embeddings(model, data.val_dataloader(), limit)
    clf = LogisticRegression(C=c, max_iter=5000).fit(x_train.numpy(), y_train.numpy())
    pred = clf.predict(x_val.numpy())
    return {
        "after": {
            "accuracy": float(accuracy_score(y_val.numpy(), pred)),
            "macro_f1": float(f1_score(y_val.numpy(), pred, average="macro")),
        },
        "C": c,
        "train_examples": len(y_train),
        "val_examples": len(y_val),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-lr", type=float, default=5e-5, help="learning rate of full fine-tuning")
    ap.add_argument("--probe-c", type=float, default=1.0, help="inverse regularisation of the probe")
    ap.add_argument("--root", default="outputs/demo_baselines", help="Trainer default_root_dir")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/demo_baselines.json)")
    add_quick_flag(ap)
    args = ap.parse_args(argv)
    apply_quick(args)
    recipe = read_recipe(RECIPE)
    if quick():
        recipe["max_epochs"] = 1
    root = Path(args.root)
    results = {
        "lora": train(recipe, root / "lora", lora=True, lr=None),
        "full_finetuning": train(recipe, root / "full", lora=False, lr=args.full_lr),
        "logistic_regression": probe(recipe, args.probe_c),
    }
    rows = [
        [name, f"{r['after']['accuracy']:.1%}", f"{r['after']['macro_f1']:.3f}", str(r.get("epochs", "-"))]
        for name, r in results.items()
    ]
    print(f"bundled sentiment task, validation split, recipe {RECIPE.name}")
    print_table(["method", "val accuracy", "macro F1", "epochs"], rows)
    payload = {
        "benchmark": "demo_baselines",
        "recipe": str(RECIPE.relative_to(RECIPE.parents[1])),
        "seed": recipe["seed"],
        "machine": machine_info(),
        "results": results,
    }
    print(f"wrote {write_json('demo_baselines', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
