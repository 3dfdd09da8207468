"""The PET / iPET pipeline (Schick & Schütze 2021) from one YAML file: ``lightning-peft pet --config x.yaml``.

1. Pattern models: one model per pattern-verbalizer pair, trained with PET's loss on the labeled set. All
   patterns share **one frozen base**: the tuner is injected once and each pattern's adapter (plus its
   soft tokens) is a saved tensor set swapped into it (``tuner: null`` = full fine-tuning: whole copies).
2. iPET generations (``ipet.generations > 0``): model ``i`` is retrained from its initial adapter on the
   labeled set plus unlabeled examples labeled by a random 25% of the other models, the added set growing
   x5 per generation, drawn per class by confidence (:mod:`lightning_peft.prompting.ensemble`).
3. Soft labels: the last generation's models label the unlabeled set; their raw logits are averaged (or
   weighted by each pattern's accuracy on the labeled set before training: ``weighting: accuracy``).
4. Distillation: a final classifier (``final.pattern``-th pattern, fresh adapter) learns the soft labels
   with ``KL(softmax(t/T) || softmax(s/T)) * T^2``.

Every stage writes its result (adapter tensors, logits) under ``output_dir`` and is skipped when that file
exists, so a killed pipeline resumes where it stopped, with the same numbers: each stage seeds its RNGs
from ``(seed, stage)``. ``results.json`` holds the validation accuracy of every pattern model, of the
ensemble and of the final classifier.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_peft as lp
from lightning_peft.config import config_from_dict
from lightning_peft.prompting.ensemble import (
    ensemble_logits,
    ipet_class_counts,
    ipet_draw,
    ipet_subset,
)
from lightning_peft.prompting.models import lm_from_config, load_lm, load_lm_tokenizer
from lightning_peft.tasks.prompt_classifier import PromptClassifier
from lightning_peft.tasks.prompt_data import PromptData, RawCollator

__all__ = ["PETConfig", "predict_scores", "run_pet"]

Example = dict[str, Any]


@dataclass(kw_only=True)
class PETConfig:
    """The pipeline's YAML (every key is a field; unknown keys are an error).

    Attributes:
        patterns: Templates, one pattern model each (>= 1; iPET needs >= 2).
        verbalizer: Label -> words, shared by the patterns, or a list with one verbalizer per pattern.
        model_name_or_path: The pretrained LM (or ``config`` + ``tokenizer`` for a tiny random one).
        config: Random-init LM config (tests, smoke runs).
        tokenizer: Tokenizer folder / name (default: the model's).
        tuner: Tuner dict (``{"method": "lora", ...}``) shared by every model; ``None`` = full fine-tuning.
        data: :class:`~lightning_peft.tasks.PromptData` arguments (``shots_per_class``, paths, ``slots``).
        unlabeled_size: Unlabeled examples drawn from the training file's other rows.
        train: Pattern-model training: ``max_steps``, ``batch_size``, ``learning_rate``, ``aggregation``,
            ``max_length``, ``mlm_weight``, ...
        weighting: ``"mean"`` or ``"accuracy"`` (PET's weighting by pre-training accuracy).
        ipet: ``generations`` (0 = PET), ``share`` (0.25), ``scale`` (5.0).
        final: ``pattern`` (index), ``temperature`` (2.0), ``max_steps``, ``learning_rate``,
            ``batch_size``.
        output_dir: Where stages write their results.
        seed: Base seed of every stage.
    """

    patterns: list[str]
    verbalizer: dict[str, list[str]] | list[dict[str, list[str]]]
    model_name_or_path: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    tuner: dict[str, Any] | None = None
    data: dict[str, Any] = field(default_factory=dict)
    unlabeled_size: int = 200
    train: dict[str, Any] = field(default_factory=dict)
    weighting: str = "mean"
    ipet: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    output_dir: str = "outputs/pet"
    seed: int = 42

    def __post_init__(self) -> None:
        if not self.patterns:
            raise ValueError("patterns must list at least one template")
        if isinstance(self.verbalizer, list) and len(self.verbalizer) != len(self.patterns):
            raise ValueError(f"{len(self.verbalizer)} verbalizers for {len(self.patterns)} patterns")
        if self.weighting not in ("mean", "accuracy"):
            raise ValueError(f"weighting must be 'mean' or 'accuracy'; got {self.weighting!r}")
        if self.unlabeled_size < 1:
            raise ValueError(
                f"unlabeled_size must be >= 1 (PET labels an unlabeled set); got {self.unlabeled_size}"
            )
        if self.ipet.get("generations", 0) and len(self.patterns) < 2:
            raise ValueError("iPET needs at least 2 patterns (each model learns from the others' labels)")

    @classmethod
    def from_yaml(cls, path: str | Path) -> PETConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"{path}: unknown keys {unknown}; allowed: {sorted(f.name for f in fields(cls))}"
            )
        return cls(**data)

    def verbalizer_for(self, index: int) -> dict[str, list[str]]:
        return self.verbalizer[index] if isinstance(self.verbalizer, list) else self.verbalizer


class _Bank:
    """One base LM with one tuner; every model's trainable state is a saved tensor set swapped in."""

    def __init__(self, cfg: PETConfig) -> None:
        self.cfg = cfg
        L.seed_everything(cfg.seed, verbose=False)  # a random-init base and the tuner's init are seeded
        self.base = lm_from_config(cfg.config) if cfg.config is not None else load_lm(cfg.model_name_or_path)  # type: ignore[arg-type]
        self.tokenizer = load_lm_tokenizer(cfg.tokenizer or cfg.model_name_or_path)
        self.full = cfg.tuner is None
        if not self.full:
            lp.inject(self.base, config_from_dict(dict(cfg.tuner)))  # type: ignore[arg-type]
        self.init_state = self._state(self.base)

    def _state(self, module: nn.Module) -> dict[str, Tensor]:
        source = module.state_dict() if self.full else lp.trainable_state_dict(module)
        return {k: v.detach().clone() for k, v in source.items()}

    def classifier(self, pattern: int, **overrides: Any) -> PromptClassifier:
        """A pattern's classifier on the shared base, its adapter reset to the initial state."""
        self.base.load_state_dict(self.init_state, strict=self.full)
        train = {k: v for k, v in self.cfg.train.items() if k not in ("max_steps", "batch_size")}
        train.update(overrides)
        return PromptClassifier(
            template=self.cfg.patterns[pattern],
            verbalizer=self.cfg.verbalizer_for(pattern),
            tokenizer=self.tokenizer,
            lm=self.base,
            **train,
        )

    def save(self, model: PromptClassifier, path: Path) -> None:
        state = model.state_dict() if self.full else lp.trainable_state_dict(model)
        torch.save({k: v.detach().clone() for k, v in state.items()}, path)

    def load(self, model: PromptClassifier, path: Path) -> None:
        state = torch.load(path, weights_only=True)
        if self.full:
            model.load_state_dict(state)
        else:  # strict for the adapter's and soft tokens' keys
            lp.load_trainable_state_dict(model, state)


def predict_scores(model: PromptClassifier, examples: list[Example], batch_size: int = 32) -> Tensor:
    """``(N, C)`` class scores of ``model`` on raw examples (eval mode, no gradients)."""
    if not examples:
        raise ValueError("no examples to score")
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = [ex["slots"] for ex in examples[start : start + batch_size]]
            out.append(model(model.encode_examples(chunk)).float())
    model.train(was_training)
    return torch.cat(out)


def _fit(
    model: PromptClassifier, examples: list[Example], max_steps: int, batch_size: int, seed: int
) -> None:
    L.seed_everything(seed, verbose=False)
    loader = DataLoader(
        examples,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=RawCollator(),
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, train_dataloaders=loader)


def _accuracy(scores: Tensor, examples: list[Example]) -> float:
    labels = torch.tensor([ex["label"] for ex in examples])
    return float((scores.argmax(-1) == labels).float().mean())


def run_pet(cfg: PETConfig) -> dict[str, Any]:
    """Run (or resume) the whole pipeline; returns and writes ``results.json``."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = PromptData(**{"seed": cfg.seed, **cfg.data})
    labeled = data.train_examples()
    used = {ex["index"] for ex in labeled}
    pool = [ex for ex in data.examples("train") if ex["index"] not in used]
    if not pool:
        raise ValueError("the unlabeled set is empty: the training file has no rows beyond the labeled ones")
    rng = np.random.default_rng(cfg.seed)
    unlabeled = [
        pool[i] for i in sorted(rng.choice(len(pool), min(cfg.unlabeled_size, len(pool)), replace=False))
    ]
    val = data.examples("val") if data.paths["val"] else []
    bank = _Bank(cfg)
    k, steps, bs = (
        len(cfg.patterns),
        int(cfg.train.get("max_steps", 100)),
        int(cfg.train.get("batch_size", 8)),
    )
    results: dict[str, Any] = {"config": asdict(cfg), "generations": []}

    weights = None
    if cfg.weighting == "accuracy":  # PET: each pattern's accuracy on the labeled set before training
        weights = [_accuracy(predict_scores(bank.classifier(i), labeled), labeled) for i in range(k)]
        results["weights"] = weights

    train_sets = [list(labeled) for _ in range(k)]
    generations = int(cfg.ipet.get("generations", 0))
    logits: list[Tensor] = []
    for gen in range(generations + 1):
        if gen > 0:
            train_sets = _ipet_sets(cfg, labeled, unlabeled, logits, weights, gen, data.num_labels)
        logits, val_acc = [], []
        for i in range(k):
            stem = out / f"gen{gen}_pattern{i}"
            model = bank.classifier(i)
            if not stem.with_suffix(".pt").exists():
                _fit(model, train_sets[i], steps, bs, seed=cfg.seed + 1000 * gen + i)
                bank.save(model, stem.with_suffix(".pt"))
                torch.save(predict_scores(model, unlabeled), stem.with_suffix(".logits"))
            bank.load(model, stem.with_suffix(".pt"))
            logits.append(torch.load(stem.with_suffix(".logits"), weights_only=True))
            if val:
                val_acc.append(_accuracy(predict_scores(model, val), val))
        results["generations"].append({"train_sizes": [len(s) for s in train_sets], "val_acc": val_acc})

    teacher = ensemble_logits(logits, weights)  # (U, C)
    results["soft_label_acc"] = _accuracy(teacher, unlabeled)  # against the hidden true labels
    if val:
        val_scores = []
        for i in range(k):
            model = bank.classifier(i)
            bank.load(model, out / f"gen{generations}_pattern{i}.pt")
            val_scores.append(predict_scores(model, val))
        results["ensemble_val_acc"] = _accuracy(ensemble_logits(val_scores, weights), val)
    results["final_val_acc"] = _distill(cfg, bank, unlabeled, teacher, val, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _ipet_sets(
    cfg: PETConfig,
    labeled: list[Example],
    unlabeled: list[Example],
    logits: list[Tensor],
    weights: list[float] | None,
    gen: int,
    num_labels: int,
) -> list[list[Example]]:
    """Generation ``gen``'s training set of every model (labeled + confidently relabeled examples)."""
    rng = np.random.default_rng([cfg.seed, gen])
    k = len(logits)
    counts = ipet_class_counts(
        [ex["label"] for ex in labeled], num_labels, gen - 1, cfg.ipet.get("scale", 5.0)
    )
    sets = []
    for i in range(k):
        subset = ipet_subset(i, k, rng, cfg.ipet.get("share", 0.25))
        w = [weights[j] for j in subset] if weights is not None else None
        chosen, labels = ipet_draw(ensemble_logits([logits[j] for j in subset], w), counts, rng)
        extra = [{**unlabeled[j], "label": y} for j, y in zip(chosen, labels, strict=True)]
        sets.append([*labeled, *extra])
    return sets


def _distill(
    cfg: PETConfig, bank: _Bank, unlabeled: list[Example], teacher: Tensor, val: list[Example], out: Path
) -> float | None:
    final = dict(cfg.final)
    pattern = int(final.pop("pattern", 0))
    steps = int(final.pop("max_steps", cfg.train.get("max_steps", 100)))
    bs = int(final.pop("batch_size", cfg.train.get("batch_size", 8)))
    model = bank.classifier(pattern, **final)
    path = out / "final.pt"
    if not path.exists():
        targets = [{**ex, "targets": t.tolist()} for ex, t in zip(unlabeled, teacher, strict=True)]
        _fit(model, targets, steps, bs, seed=cfg.seed + 999_999)
        bank.save(model, path)
    bank.load(model, path)
    return _accuracy(predict_scores(model, val), val) if val else None


def main(argv: list[str] | None = None) -> None:
    """``lightning-peft pet --config pipeline.yaml``."""
    import argparse

    parser = argparse.ArgumentParser(prog="lightning-peft pet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the pipeline YAML (see PETConfig)")
    args = parser.parse_args(argv)
    results = run_pet(PETConfig.from_yaml(args.config))
    summary = {k: v for k, v in results.items() if k != "config"}
    print(json.dumps(summary, indent=2))
