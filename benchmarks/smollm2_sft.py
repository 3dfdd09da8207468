"""The SmolLM2 LoRA instruction-tuning recipe, end to end, with its before/after numbers as JSON.

Runs ``lightning-peft fit --config configs/smollm2_lora_sft.yaml`` (the README's command) in this process,
then writes the CLI's end-of-run summary (trainable parameters, adapter checkpoint size, held-out loss /
perplexity / token accuracy / exact match / token F1 before and after training) plus the wall time and the
machine to ``benchmarks/results/smollm2_lora_sft.json``.

    python benchmarks/smollm2_sft.py
    python benchmarks/smollm2_sft.py --collect outputs/smollm2_lora_sft/checkpoints/summary.json \
        --wall-seconds 759 --cpu-seconds 160   # record a run already made with the CLI (/usr/bin/time)
    python benchmarks/smollm2_sft.py --quick --out /tmp/sft.json   # smoke run: the recipe on a tiny decoder

The recipe is fixed before running (60 steps, batch 4, LoRA r=16 on q_proj/v_proj, lr 2e-3); one run,
reported as it came out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_quick_flag, apply_quick, machine_info, tiny_smollm2_config, write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_lora_sft.yaml"
SUMMARY = ROOT / "outputs" / "smollm2_lora_sft" / "checkpoints" / "summary.json"


def quick_config(workdir: Path) -> Path:
    """The recipe shrunk for ``--quick``: the same callbacks, data and task module, but a 2-layer width-32
    random decoder with SmolLM2's tokenizer, one step of 2 conversations, one validation batch, 2 greedy
    answers of 2 tokens, no logger, checkpoints under ``workdir``. Returns the YAML written there."""
    import yaml

    recipe = yaml.safe_load(CONFIG.read_text())
    trainer = recipe["trainer"]
    trainer.update(max_steps=1, limit_val_batches=1, default_root_dir=str(workdir), logger=False)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith(("ModelCheckpoint", "LastCheckpoint")):
            callback["init_args"].update(dirpath=str(workdir / "checkpoints"), every_n_train_steps=1)
    model = {k: v for k, v in recipe["model"]["init_args"].items() if k != "model_name_or_path"}
    model.update(config=tiny_smollm2_config(), num_eval_generations=2, max_new_tokens=2, num_samples=1)
    recipe["model"]["init_args"] = model
    recipe["data"]["init_args"].update(max_length=64, batch_size=2)
    path = workdir / "smollm2_lora_sft_quick.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> None:
    """Run (or collect) the recipe and write its JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--collect", type=Path, help="summary.json of a finished CLI run (skip training)")
    parser.add_argument("--wall-seconds", type=float, help="wall time of the collected run")
    parser.add_argument("--cpu-seconds", type=float, help="user + system CPU time of the collected run")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/smollm2_lora_sft.json)")
    add_quick_flag(parser)
    args = parser.parse_args(argv)
    apply_quick(args)
    if args.quick and (not args.out or args.collect):
        parser.error("--quick trains a shrunk recipe and writes nothing into benchmarks/results/: pass --out")
    with tempfile.TemporaryDirectory() as tmp:
        config = quick_config(Path(tmp)) if args.quick else CONFIG
        summary_path = Path(tmp) / "checkpoints" / "summary.json" if args.quick else SUMMARY
        payload = run(args, config, summary_path)
    print(f"wrote {write_json('smollm2_lora_sft', payload, args.out)}")


def run(args: argparse.Namespace, config: Path, summary_path: Path) -> dict[str, Any]:
    """Train with ``config`` (unless ``--collect``) and gather the summary, times and machine."""
    wall, cpu = args.wall_seconds, args.cpu_seconds
    if args.collect is not None:
        summary_path = args.collect
    else:
        from lightning_peft.cli import main as cli_main

        start, cpu_start = time.perf_counter(), time.process_time()
        cli_main(["fit", "--config", str(config)])
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    summary = json.loads(Path(summary_path).read_text())
    return {
        "command": "lightning-peft fit --config configs/smollm2_lora_sft.yaml"
        + (" (--quick: shrunk, see config)" if args.quick else ""),
        "config": config.read_text(),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "summary": summary,
        "machine": machine_info(),
    }


if __name__ == "__main__":
    main()
