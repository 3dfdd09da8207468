"""The ``lightning-peft`` CLI: every recipe in configs/ parses and instantiates; a tiny recipe trains."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from lightning_peft.callbacks import PEFT
from lightning_peft.callbacks.adapter_checkpoint import META_KEY
from lightning_peft.cli import PEFTCLI, main
from lightning_peft.tasks import TextClassifier

CONFIGS_DIR = Path(__file__).parents[1] / "configs"
CONFIGS = sorted(CONFIGS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_parses_and_instantiates(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = PEFTCLI(model_class=None, datamodule_class=None, run=False, args=["--config", str(path)])
    assert cli.model is not None and cli.trainer is not None
    if "attention" not in path.stem:
        assert any(isinstance(cb, PEFT) for cb in cli.trainer.callbacks)


def test_tiny_recipe_trains_and_summarises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(Path(__file__).parents[1] / "configs" / "tiny_lora.yaml")])
    out = capsys.readouterr().out
    assert "lightning-peft summary" in out and "before ->" in out
    ckpt = torch.load(tmp_path / "outputs/tiny_lora/checkpoints/last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"]) - {META_KEY}
    assert keys and all("lora_" in k or k.startswith("classifier.") for k in keys)
    assert (tmp_path / "outputs/tiny_lora/checkpoints/summary.json").exists()
    # Resuming from the last checkpoint continues the run instead of starting over.
    main(
        [
            "fit",
            "--config",
            str(Path(__file__).parents[1] / "configs" / "tiny_lora.yaml"),
            "--trainer.max_steps",
            "8",
            "--ckpt_path",
            "last",
        ]
    )
    resumed = torch.load(tmp_path / "outputs/tiny_lora/checkpoints/last.ckpt", weights_only=False)
    assert resumed["global_step"] == 8


def test_unknown_tuner_field_in_a_recipe_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    text = (Path(__file__).parents[1] / "configs" / "tiny_lora.yaml").read_text()
    bad.write_text(text.replace("          r: 4", "          rank: 4"))
    with pytest.raises((ValueError, SystemExit)):
        PEFTCLI(model_class=None, datamodule_class=None, run=False, args=["--config", str(bad)])


def test_help_lists_export_next_to_the_trainer_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict"):
        assert f"\n    {name} " in out
    section = out[out.index("other subcommands:") :]
    assert section.splitlines()[1].split()[:2] == ["export", "Turn"]  # its own row, line breaks kept
    assert "lightning-peft export --help" in section
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "other subcommands:" not in capsys.readouterr().out  # the subcommands' help is LightningCLI's
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: lightning-peft export")


def _recipe(tmp_path: Path, name: str = "tiny_lora", edit: Callable[[dict], None] | None = None) -> Path:
    """A copy of ``configs/<name>.yaml`` under ``tmp_path``, changed by ``edit``."""
    recipe = yaml.safe_load((CONFIGS_DIR / f"{name}.yaml").read_text())
    if edit is not None:
        edit(recipe)
    out = tmp_path / f"{name}_edited.yaml"
    out.write_text(yaml.safe_dump(recipe))
    return out


def _drop_tuner(recipe: dict) -> None:
    callbacks = recipe["trainer"]["callbacks"]
    callbacks[:] = [cb for cb in callbacks if not cb["class_path"].endswith(".PEFT")]
    recipe["model"]["init_args"]["learning_rate"] = 1e-4


def test_summary_counts_every_trained_parameter_with_and_without_a_tuner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(_recipe(tmp_path, edit=_drop_tuner))])  # full fine-tuning
    summary = json.loads((tmp_path / "outputs/tiny_lora/checkpoints/summary.json").read_text())
    recipe = yaml.safe_load((CONFIGS_DIR / "tiny_lora.yaml").read_text())
    model = TextClassifier(**recipe["model"]["init_args"])
    every = sum(p.numel() for p in model.parameters())
    assert summary["trainable_params"] == summary["total_params"] == every
    # With LoRA, the trained tensors are exactly those the adapter-only checkpoint holds.
    main(["fit", "--config", str(CONFIGS_DIR / "tiny_lora.yaml"), "--trainer.default_root_dir", "lora"])
    summary = json.loads((tmp_path / "outputs/tiny_lora/checkpoints/summary.json").read_text())
    state = torch.load(tmp_path / "outputs/tiny_lora/checkpoints/last.ckpt", weights_only=False)["state_dict"]
    saved = sum(v.numel() for k, v in state.items() if k != META_KEY)
    assert summary["total_params"] > every  # the adapters join the base's parameters
    assert 0 < summary["trainable_params"] == saved < every / 10
