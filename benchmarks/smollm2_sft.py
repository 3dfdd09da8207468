"""The SmolLM2 LoRA instruction-tuning recipe, end to end, with its before/after numbers as JSON.

Runs ``lightning-peft fit --config configs/smollm2_lora_sft.yaml`` (the README's command) in this process,
then writes the CLI's end-of-run summary (trainable parameters, adapter checkpoint size, held-out loss /
perplexity / token accuracy / exact match / token F1 before and after training) plus the wall time and the
machine to ``benchmarks/results/smollm2_lora_sft.json``.

    python benchmarks/smollm2_sft.py
    python benchmarks/smollm2_sft.py --collect outputs/smollm2_lora_sft/checkpoints/summary.json \
        --wall-seconds 759 --cpu-seconds 160   # record a run already made with the CLI (/usr/bin/time)

The recipe is fixed before running (60 steps, batch 4, LoRA r=16 on q_proj/v_proj, lr 2e-3); one run,
reported as it came out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_lora_sft.yaml"
SUMMARY = ROOT / "outputs" / "smollm2_lora_sft" / "checkpoints" / "summary.json"


def main(argv: list[str] | None = None) -> None:
    """Run (or collect) the recipe and write its JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--collect", type=Path, help="summary.json of a finished CLI run (skip training)")
    parser.add_argument("--wall-seconds", type=float, help="wall time of the collected run")
    parser.add_argument("--cpu-seconds", type=float, help="user + system CPU time of the collected run")
    parser.add_argument("--out", help="output JSON (default benchmarks/results/smollm2_lora_sft.json)")
    args = parser.parse_args(argv)
    wall, cpu = args.wall_seconds, args.cpu_seconds
    summary_path = args.collect
    if summary_path is None:
        from lightning_peft.cli import main as cli_main

        start, cpu_start = time.perf_counter(), time.process_time()
        cli_main(["fit", "--config", str(CONFIG)])
        wall, summary_path = time.perf_counter() - start, SUMMARY
        cpu = time.process_time() - cpu_start
    summary = json.loads(Path(summary_path).read_text())
    payload = {
        "command": "lightning-peft fit --config configs/smollm2_lora_sft.yaml",
        "config": CONFIG.read_text(),
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "summary": summary,
        "machine": machine_info(),
    }
    print(f"wrote {write_json('smollm2_lora_sft', payload, args.out)}")


if __name__ == "__main__":
    main()
