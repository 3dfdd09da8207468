"""Few-shot text classification: head fine-tuning vs prompt-based fine-tuning vs LM-BFF demonstrations vs PET
ensembles vs zero-shot, with LoRA and full fine-tuning, on SmolLM2-135M-Instruct (causal LM), 16 / 32
examples per class.

The claim under test (LM-BFF, Gao et al. 2021, SST-2 with RoBERTa-large, 16 per class): prompt-based
fine-tuning beats fine-tuning a new head by a wide margin (81.4 -> 92.7).

Protocol (fixed before running): for each task, shots per class and seed, the training set is drawn with
:func:`~lightning_peft.tasks.prompt_data.few_shot_sample` (same draw for every method); every method trains
``--steps`` AdamW steps of batch ``--batch-size`` (linear decay, no warmup) from the same pretrained weights
and is evaluated on the same ``--eval-size`` validation examples. Learning rates: full fine-tuning 2e-5,
LoRA (r=8, alpha=16, q_proj/v_proj) 5e-4; the new head of head fine-tuning gets 1e-3 in both (at 2e-5 a
fresh head barely moves in this many steps). Head fine-tuning (``head_*``): the last real token's final hidden
state (what Hugging Face's GPT-2 / Llama sequence classifiers pool) + a linear head (``TextClassifier``);
``headmean_*``: the same with mean pooling, the first baseline of this grid, which left the head near chance
on sentiment (a decoder's mean-pooled states are dominated by the first tokens' very large activations).
Prompt-based: ``PromptClassifier`` with PET's loss (CE over the verbalizer's class scores, ``"pet"``
aggregation, single-token label words). Demonstrations: LM-BFF's one per class drawn from the most similar
50% (MiniLM embeddings) of the training set, fresh per step; ``--demo-sets`` sets averaged at inference. PET
ensemble (``pet_*``): the task's three patterns, one model each (same tuner, same steps), their averaged
logits label 128 unlabeled pool rows, and the first pattern's fresh model distills them (KL, T=2, times
T^2); ``acc`` is the distilled model's, ``ensemble_acc`` the three patterns' average. Zero-shot: the pattern
and verbalizer without training (no seed dependence). Probe: logistic regression on the frozen model's
last-token states of the same draw, i.e. a converged head without fine-tuning. No pretrained masked LM with
its MLM head ships offline here (all-MiniLM-L6-v2 is a sentence-embedding encoder without one), so the grid is
causal-LM only.

The README grid: both tasks, 30 steps of batch 8, up to 200 validation examples (the stdlib task has 132),
one process per task, one thread each, from the repository root. It first ran phase 1 below with mean-pooled
heads (those runs are kept as ``headmean_*``); after the pooling finding the order became, per task (each
command appends with ``--resume``; what the CPU time allowed is what the JSON holds, the README marks the
rest "not run")::

    T=demo_sentiment; OUT=benchmarks/results/few_shot_$T.json; export OMP_NUM_THREADS=1
    # phase 1 as first run (16 and 32 shots, 5 seeds; its head runs renamed headmean_*)
    .venv/bin/python benchmarks/few_shot.py --tasks $T --seeds 0 1 2 3 4 \
        --methods zero_shot head_lora head_full prompt_lora prompt_full --out $OUT
    # then: 16 shots, the claim with the last-token head and the probe control
    .venv/bin/python benchmarks/few_shot.py --tasks $T --seeds 0 1 2 3 4 --shots 16 --resume --out $OUT \
        --methods probe prompt_lora prompt_full head_lora head_full
    # demonstrations and PET ensembles with LoRA, 3 seeds
    .venv/bin/python benchmarks/few_shot.py --tasks $T --seeds 0 1 2 --shots 16 --resume --out $OUT \
        --methods demos_lora pet_lora
    # 32 shots with the last-token head; then full fine-tuning of demonstrations and PET
    .venv/bin/python benchmarks/few_shot.py --tasks $T --seeds 0 1 2 3 4 --shots 32 --resume --out $OUT \
        --methods probe prompt_lora prompt_full head_lora head_full
    .venv/bin/python benchmarks/few_shot.py --tasks $T --seeds 0 1 2 --shots 16 --resume --out $OUT \
        --methods demos_full pet_full

Other invocations::

    .venv/bin/python benchmarks/few_shot.py --seeds 0 --steps 2 --eval-size 16 --out /tmp/smoke.json
    .venv/bin/python benchmarks/few_shot.py --quick --out /tmp/quick.json   # smoke run: tiny random decoder

Results (accuracy per run, mean / std / median / IQR per cell, seconds per run) are written after every run,
so a killed run keeps what it measured and ``--resume`` goes on from there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_peft as lp
from benchmarks.common import add_quick_flag, apply_quick, quick, tiny_smollm2_config
from benchmarks.few_shot_data import build as build_stdlib
from lightning_peft.prompting.models import load_lm_tokenizer
from lightning_peft.prompting.pet import PETConfig, run_pet
from lightning_peft.tasks.prompt_classifier import PromptClassifier
from lightning_peft.tasks.prompt_data import PromptData, few_shot_sample
from lightning_peft.tasks.text_classification import TextClassifier

RESULTS = Path(__file__).resolve().parent / "results"
TASKS: dict[str, dict[str, Any]] = {
    "demo_sentiment": {
        "template": "Review: {text} Sentiment: {answer}",
        "verbalizer": {"negative": ["negative"], "positive": ["positive"]},
        # PET ensembles: the template above and two more patterns, same verbalizer.
        "patterns": [
            "{text} All in all, the review is {answer}",
            "Text: {text}\nQuestion: is this review positive or negative?\nAnswer: {answer}",
        ],
    },
    "stdlib_topic": {
        "template": "Python documentation: {text} Topic: {answer}",
        "verbalizer": {"numbers": ["numbers"], "text": ["text"]},
        "patterns": [
            "{text} This function works on {answer}",
            "Docstring: {text}\nQuestion: does this work on text or numbers?\nAnswer: {answer}",
        ],
    },
}
UNLABELED = 128  # PET's unlabeled set: training-pool rows outside the labeled draw
LR = {"full": 2e-5, "lora": 5e-4, "head": 1e-3}


def smollm2_path() -> str:
    """``"smollm2"`` when this install resolves it, else the cached converted folder."""
    from lightning_peft.tasks.pretrained import resolve_pretrained_path

    try:
        return str(resolve_pretrained_path("smollm2"))
    except (FileNotFoundError, ImportError, ValueError):
        cached = Path.home() / ".cache/lightning-peft/smollm2-135m-instruct.q4_1-fp32"
        if not cached.is_dir():
            raise
        return str(cached)


def model_source(path: str, tokenizer: bool) -> dict[str, Any]:
    """The model arguments of a task module: the pretrained folder, or under ``--quick`` a 2-layer width-32
    random decoder (``config``) with SmolLM2's tokenizer (``tokenizer=path`` when the module takes one)."""
    if not quick():
        return {"model_name_or_path": path}
    return {"config": tiny_smollm2_config(), **({"tokenizer": path} if tokenizer else {})}


def load_task(name: str) -> tuple[list[dict], list[dict], list[str]]:
    """``(train pool, val, label names)`` as PromptData examples."""
    if name == "demo_sentiment":
        data = PromptData(seed=0)
        return data.examples("train"), data.examples("val"), data.label_names
    train, val = build_stdlib()
    names = sorted({r["label"] for r in train})
    conv = [
        [
            {"slots": {"text": r["text"]}, "label": names.index(r["label"]), "index": i}
            for i, r in enumerate(rows)
        ]
        for rows in (train, val)
    ]
    return conv[0], conv[1], names


def lora(targets: list[str], save: list[str] | None = None) -> lp.LoRAConfig:
    return lp.LoRAConfig(r=8, alpha=16, target_modules=targets, modules_to_save=save)


def optimizer(model: torch.nn.Module, tuning: str, head: torch.nn.Module | None, steps: int):
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": body, "lr": LR[tuning]}]
    if head is not None:
        groups.append({"params": list(head.parameters()), "lr": LR["head"]})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    return opt, sched


def batches(examples: list[dict], batch_size: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(len(examples), generator=g).tolist()
    for s in range(steps):
        yield [examples[i] for i in order[s * batch_size : (s + 1) * batch_size]]


def run_prompt(
    path: str,
    task: dict,
    train: list[dict],
    val: list[dict],
    tuning: str | None,
    args: argparse.Namespace,
    seed: int,
    demos: bool = False,
) -> float:
    torch.manual_seed(seed)
    model = PromptClassifier(
        template=task["template"],
        verbalizer=task["verbalizer"],
        **model_source(path, tokenizer=True),
        max_length=128,
        demonstrations=args.demo_sets if demos else 0,
        soft_seed=seed,
    )
    if demos:
        model.set_demonstration_pool(train)
    if tuning == "lora":
        lp.inject(model.model, lora(["q_proj", "v_proj"]))
    if tuning is not None:
        opt, sched = optimizer(model, tuning, None, args.steps)
        model.train()
        for step, chunk in enumerate(batches(train, args.batch_size, args.steps, seed)):
            slots = [ex["slots"] for ex in chunk]
            labels = torch.tensor([ex["label"] for ex in chunk])
            d = [model.sampler.sample(ex, step + 1, exclude_self=True) for ex in chunk] if demos else None
            loss = torch.nn.functional.cross_entropy(model(model.encode_examples(slots, d)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return evaluate_prompt(model, val, args, demos)


@torch.no_grad()
def evaluate_prompt(model: PromptClassifier, val: list[dict], args: argparse.Namespace, demos: bool) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(val), args.eval_batch):
        chunk = val[start : start + args.eval_batch]
        slots = [ex["slots"] for ex in chunk]
        if demos:
            sets = [
                model.encode_examples(slots, [model.sampler.sample(ex, 2**30 + d) for ex in chunk])
                for d in range(args.demo_sets)
            ]
            scores = model.eval_scores({"prompt_sets": sets})
        else:
            scores = model(model.encode_examples(slots))
        correct += int((scores.argmax(-1) == torch.tensor([ex["label"] for ex in chunk])).sum())
    return correct / len(val)


def run_head(
    path: str,
    train: list[dict],
    val: list[dict],
    tuning: str,
    args: argparse.Namespace,
    seed: int,
    pooling: str = "last",
) -> float:
    """Head fine-tuning: the last real token's state (what Hugging Face's decoder classifiers pool; the
    ``headmean_*`` methods mean-pool instead) + a new linear head."""
    torch.manual_seed(seed)
    model = TextClassifier(**model_source(path, tokenizer=False), num_labels=2, pooling=pooling, dropout=0.1)
    tok = load_lm_tokenizer(path)
    if tuning == "lora":
        lp.inject(model, lora(["q_proj", "v_proj"], save=["classifier"]))
    opt, sched = optimizer(model, tuning, model.classifier, args.steps)

    def encode(chunk: list[dict]) -> dict[str, torch.Tensor]:
        return tok(
            [ex["slots"]["text"] for ex in chunk],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )

    model.train()
    for chunk in batches(train, args.batch_size, args.steps, seed):
        enc = encode(chunk)
        logits = model(enc["input_ids"], enc["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([ex["label"] for ex in chunk]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(val), args.eval_batch):
            chunk = val[start : start + args.eval_batch]
            enc = encode(chunk)
            preds = model(enc["input_ids"], enc["attention_mask"]).argmax(-1)
            correct += int((preds == torch.tensor([ex["label"] for ex in chunk])).sum())
    return correct / len(val)


@torch.no_grad()
def run_probe(path: str, train: list[dict], val: list[dict], args: argparse.Namespace, seed: int) -> float:
    """The converged frozen-body head: scikit-learn's ``LogisticRegression`` (C=1) on the last real token's
    final hidden state, for the same training draw. A control for head fine-tuning, whose new head may not
    have converged in ``--steps`` steps: what a head on the frozen model reaches when it has."""
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(seed)
    model = TextClassifier(**model_source(path, tokenizer=False), num_labels=2, pooling="last").eval()
    tok = load_lm_tokenizer(path)

    def features(rows: list[dict]) -> torch.Tensor:
        out = []
        for start in range(0, len(rows), args.eval_batch):
            chunk = rows[start : start + args.eval_batch]
            enc = tok(
                [ex["slots"]["text"] for ex in chunk],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            hidden = model.backbone(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            out.append(model.pool(hidden.last_hidden_state, enc["attention_mask"]))
        return torch.cat(out).float()

    clf = LogisticRegression(C=1.0, max_iter=5000)
    clf.fit(features(train).numpy(), [ex["label"] for ex in train])
    pred = clf.predict(features(val).numpy())
    return float((torch.tensor(pred) == torch.tensor([ex["label"] for ex in val])).float().mean())


def run_pet_ensemble(
    path: str,
    task: dict,
    pool: list[dict],
    val: list[dict],
    names: list[str],
    shots: int,
    tuning: str,
    args: argparse.Namespace,
    seed: int,
) -> dict[str, float]:
    """PET (Schick & Schuetze 2021): one model per pattern, their averaged logits label ``UNLABELED`` pool
    rows, a final classifier (the first pattern, fresh tuner) distills them (KL with T=2, times T^2).

    Goes through :func:`lightning_peft.prompting.pet.run_pet` (Lightning ``Trainer`` fits), on files holding
    the task's pool and validation rows; ``PromptData`` draws the labeled set with the same
    ``few_shot_sample(pool, shots, seed)`` as every other method. Returns the distilled classifier's accuracy
    (``acc``) and the ensemble's (``ensemble_acc``)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for split, rows in (("train", pool), ("val", val)):
            files[split] = Path(tmp) / f"{split}.jsonl"
            lines = [json.dumps({"text": ex["slots"]["text"], "label": names[ex["label"]]}) for ex in rows]
            files[split].write_text("\n".join(lines) + "\n")
        tuner = None
        if tuning == "lora":
            tuner = {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
        fit = {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": LR[tuning]}
        cfg = PETConfig(
            patterns=[task["template"], *task["patterns"]],
            verbalizer=task["verbalizer"],
            **model_source(path, tokenizer=True),
            tuner=tuner,
            data={
                "train_path": str(files["train"]),
                "val_path": str(files["val"]),
                "label_names": names,
                "shots_per_class": shots,
            },
            unlabeled_size=UNLABELED if not quick() else 4,
            train={**fit, "max_length": 128},
            final={**fit, "pattern": 0, "temperature": 2.0},
            output_dir=str(Path(tmp) / "pet"),
            seed=seed,
        )
        res = run_pet(cfg)
    return {
        "acc": res["final_val_acc"],
        "ensemble_acc": res["ensemble_val_acc"],
        "pattern_accs": res["generations"][-1]["val_acc"],
        "soft_label_acc": res["soft_label_acc"],
    }


def cell_stats(accs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(accs, n=4) if len(accs) >= 2 else [accs[0]] * 3
    return {
        "mean": statistics.mean(accs),
        "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "median": statistics.median(accs),
        "iqr": q[2] - q[0],
        "n": len(accs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--shots", nargs="+", type=int, default=[16, 32])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[
            "zero_shot",
            "probe",
            "head_lora",
            "head_full",
            "prompt_lora",
            "prompt_full",
            "demos_lora",
            "demos_full",
            "pet_lora",
            "pet_full",
        ],
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--eval-batch", type=int, default=32)
    parser.add_argument("--demo-sets", type=int, default=4)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/few_shot.json)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in --out and skip them (a killed or phased grid goes on where it was)",
    )
    add_quick_flag(parser)
    args = parser.parse_args()
    # Quick: every task and method once, on a random decoder: 2 shots, 1 seed, 1 step, 4 validation examples.
    apply_quick(args, shots=[2], seeds=[0], steps=1, batch_size=2, eval_size=4, eval_batch=4, demo_sets=1)
    if args.quick and not args.out:
        parser.error("--quick writes no results into benchmarks/results/: pass --out PATH")
    args.out = args.out or str(RESULTS / "few_shot.json")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = smollm2_path()
    runs: list[dict[str, Any]] = []
    earlier: list[dict[str, Any]] = []  # the arguments of the invocations whose runs were kept
    if args.resume and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        runs = previous["runs"]
        earlier = [*previous["meta"].get("earlier_args", []), previous["meta"]["args"]]
    done = {(r["task"], r["shots"], r["seed"], r["method"]) for r in runs}
    meta = {
        "args": vars(args),
        "earlier_args": earlier,
        "model": (
            f"quick smoke run: random decoder {tiny_smollm2_config()} with SmolLM2's tokenizer; the numbers "
            "mean nothing"
            if args.quick
            else "SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized to fp32)"
        ),
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
        "learning_rates": LR,
    }

    def save() -> None:
        cells: dict[str, dict[str, float]] = {}
        for key in sorted({(r["task"], r["shots"], r["method"]) for r in runs}):
            accs = [r["acc"] for r in runs if (r["task"], r["shots"], r["method"]) == key]
            cells["/".join(map(str, key))] = cell_stats(accs)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "cells": cells, "runs": runs}, indent=2))

    for task_name in args.tasks:
        task = TASKS[task_name]
        pool, val, names = load_task(task_name)
        assert names == list(task["verbalizer"]), (names, task["verbalizer"])
        val = val[: args.eval_size]
        for shots in args.shots:
            for seed in args.seeds:
                train = few_shot_sample(pool, shots, seed)
                for method in args.methods:
                    if method == "zero_shot" and (seed != args.seeds[0] or shots != args.shots[0]):
                        continue  # no training: independent of the seed and of the shots
                    if (task_name, shots, seed, method) in done:
                        continue
                    t0 = time.perf_counter()
                    kind, _, tuning = method.partition("_")
                    extra: dict[str, Any] = {}
                    if method == "zero_shot":
                        acc = run_prompt(path, task, train, val, None, args, seed)
                    elif method == "probe":
                        acc = run_probe(path, train, val, args, seed)
                    elif kind == "pet":
                        extra = run_pet_ensemble(path, task, pool, val, names, shots, tuning, args, seed)
                        acc = extra.pop("acc")
                    elif kind in ("head", "headmean"):
                        pooling = "mean" if kind == "headmean" else "last"
                        acc = run_head(path, train, val, tuning, args, seed, pooling)
                    else:
                        acc = run_prompt(path, task, train, val, tuning, args, seed, demos=kind == "demos")
                    runs.append(
                        {
                            "task": task_name,
                            "shots": shots,
                            "seed": seed,
                            "method": method,
                            "acc": acc,
                            **extra,
                            "seconds": round(time.perf_counter() - t0, 1),
                        }
                    )
                    print(json.dumps(runs[-1]), flush=True)
                    save()


if __name__ == "__main__":
    main()
