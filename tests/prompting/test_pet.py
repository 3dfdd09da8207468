"""The PET / iPET pipeline: runs from a config, is seeded, and resumes exactly mid-pipeline."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_peft.prompting.pet import PETConfig, run_pet
from lightning_peft.tasks.data import DEMO_TRAIN, DEMO_VAL

BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 30522,
    "max_position_embeddings": 64,
}


def head(src: Path, dst: Path, n: int) -> str:
    with src.open(newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    with dst.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return str(dst)


def config(tmp_path: Path, out: str, **kw: Any) -> PETConfig:
    args: dict[str, Any] = dict(
        patterns=["{text} It was {mask}.", "{text} All in all, {mask}."],
        verbalizer={"negative": ["bad"], "positive": ["good"]},
        config=BERT,
        tokenizer="minilm",
        tuner={"method": "lora", "r": 2, "target_modules": ["query", "value"]},
        data={
            "train_path": head(Path(DEMO_TRAIN), tmp_path / "train.csv", 60),
            "val_path": head(Path(DEMO_VAL), tmp_path / "val.csv", 12),
            "shots_per_class": 4,
        },
        unlabeled_size=20,
        train={"max_steps": 2, "batch_size": 4, "learning_rate": 1e-2, "max_length": 32},
        weighting="accuracy",
        ipet={"generations": 1},
        final={"max_steps": 2},
        output_dir=str(tmp_path / out),
        seed=3,
    )
    args.update(kw)
    return PETConfig(**args)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_pipeline_is_seeded_and_resumes_mid_pipeline(tmp_path: Path) -> None:
    first = run_pet(config(tmp_path, "a"))
    assert first["generations"][0]["train_sizes"] == [8, 8]
    grown = first["generations"][1]["train_sizes"]
    assert all(8 < n <= 8 + 32 for n in grown)  # iPET added relabeled examples (x5 target: 40)
    out = tmp_path / "a"
    gen0, gen1 = tensors(out / "gen0_pattern0.pt"), tensors(out / "gen1_pattern0.pt")
    assert set(gen0) == set(gen1) and all(k.startswith("model.") and "lora_" in k for k in gen0)
    assert any(not torch.equal(gen0[k], gen1[k]) for k in gen0)  # retrained on its grown set
    assert 0.0 <= first["final_val_acc"] <= 1.0 and "ensemble_val_acc" in first

    again = run_pet(config(tmp_path, "b"))  # same seed, fresh directory: identical numbers and tensors
    for name in ("gen1_pattern1.pt", "final.pt"):
        a, b = tensors(out / name), tensors(tmp_path / "b" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in again.items() if k != "config"} == {
        k: v for k, v in first.items() if k != "config"
    }

    # killed after generation 0: the later stages are recomputed from the stored ones, identically
    for name in (
        "gen1_pattern0.pt",
        "gen1_pattern0.logits",
        "gen1_pattern1.pt",
        "gen1_pattern1.logits",
        "final.pt",
        "results.json",
    ):
        (tmp_path / "b" / name).unlink()
    resumed = run_pet(config(tmp_path, "b"))
    final_a, final_b = tensors(out / "final.pt"), tensors(tmp_path / "b" / "final.pt")
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert resumed["final_val_acc"] == first["final_val_acc"]


def test_bad_pipeline_configs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="iPET needs at least 2 patterns"):
        config(tmp_path, "x", patterns=["{text} {mask}"])
    with pytest.raises(ValueError, match="unlabeled_size"):
        config(tmp_path, "x", unlabeled_size=0)
    with pytest.raises(ValueError, match="weighting"):
        config(tmp_path, "x", weighting="max")
    path = tmp_path / "bad.yaml"
    path.write_text("patterns: ['{text} {mask}']\nverbalizer: {a: [x], b: [y]}\nepochs: 3\n")
    with pytest.raises(ValueError, match="unknown keys \\['epochs'\\]"):
        PETConfig.from_yaml(path)
    tiny = tmp_path / "t.csv"
    tiny.write_text("text,label\ngood,positive\nfine,positive\nbad,negative\nawful,negative\n")
    cfg = config(tmp_path, "x", data={"train_path": str(tiny), "shots_per_class": 2})
    with pytest.raises(ValueError, match="unlabeled set is empty"):
        run_pet(cfg)


def test_cli_dispatches_the_pet_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_peft.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["pet", "--help"])
    assert exit_info.value.code == 0
    assert "lightning-peft pet" in capsys.readouterr().out
