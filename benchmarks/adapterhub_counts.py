"""Trainable-parameter counts of AdapterHub's ``adapters`` on BERT-base: the anchors the README compares with.

``adapters`` pins an older transformers (1.3.0: ``transformers~=4.57.6``), so it never enters this project's
environment. This script runs in a side environment of its own (``make adapterhub-counts`` builds it) and
writes ``benchmarks/results/adapterhub_counts.json``; ``tests/tuners/test_param_counts.py`` checks that
lightning-peft's tuners give the same counts.

Each method is the library's default config of that name, added to a randomly initialised
``BertModel(BertConfig())`` (109,482,240 parameters, no task head) and activated with ``train_adapter``;
the count is the number of parameters with ``requires_grad``. BitFit is not an ``adapters`` method and is
not counted here.

Run::

    make adapterhub-counts                                        # side venv .venv-adapters, then this script
    .venv-adapters/bin/python benchmarks/adapterhub_counts.py --quick --out /tmp/counts.json   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# README name -> adapters config: the library's own presets, defaults unless stated.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "LoRA r=8 q,v": ("LoRAConfig", {"r": 8, "alpha": 8}),
    "Houlsby rf 16": ("DoubleSeqBnConfig", {"reduction_factor": 16}),
    "Pfeiffer rf 16": ("SeqBnConfig", {"reduction_factor": 16}),
    "parallel adapter rf 2": ("ParBnConfig", {"reduction_factor": 2}),
    "Compacter": ("CompacterConfig", {}),
    "Compacter++": ("CompacterPlusPlusConfig", {}),
    "prefix 30 tokens with MLP 512": ("PrefixTuningConfig", {"prefix_length": 30, "bottleneck_size": 512}),
}


def count(config_name: str, kwargs: dict[str, Any], quick: bool) -> dict[str, int]:
    """Trainable and total parameters after adding and activating one adapter."""
    import adapters
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    shape = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128} if quick else {}
    model = BertModel(BertConfig(**shape))
    adapters.init(model)
    model.add_adapter("a", config=getattr(adapters, config_name)(**kwargs))
    model.train_adapter("a")
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total_with_adapter": sum(p.numel() for p in model.parameters()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run on a narrow BERT (numbers mean nothing)")
    ap.add_argument("--out", default=str(RESULTS / "adapterhub_counts.json"))
    args = ap.parse_args(argv)
    try:
        import adapters
        import transformers
    except ImportError:
        print(
            "needs AdapterHub's `adapters` in its own environment: run `make adapterhub-counts`",
            file=sys.stderr,
        )
        return 2
    details = {name: count(cfg, kw, args.quick) for name, (cfg, kw) in METHODS.items()}
    for name, d in details.items():
        print(f"{name:32s} {d['trainable']:>12,}")
    payload = {
        "benchmark": "adapterhub_counts",
        "model": "BertModel(BertConfig()) random init" + (" (quick: narrow)" if args.quick else ""),
        "adapters": adapters.__version__,
        "transformers": transformers.__version__,
        "configs": {name: {"class": cfg, **kw} for name, (cfg, kw) in METHODS.items()},
        "trainable": {name: d["trainable"] for name, d in details.items()},
        "details": details,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
