"""The ``lightning-peft`` CLI: every recipe in configs/ parses and instantiates; a tiny recipe trains."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_peft.callbacks import PEFT
from lightning_peft.callbacks.adapter_checkpoint import META_KEY
from lightning_peft.cli import PEFTCLI, ConfigError, main
from lightning_peft.tasks import LastCheckpoint, TextClassifier
from tests.resume import ResumedFrom

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


def test_tiny_recipe_trains_and_summarises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, assert_resumed_from: ResumedFrom
) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(Path(__file__).parents[1] / "configs" / "tiny_lora.yaml")])
    out = capsys.readouterr().out
    assert "lightning-peft summary" in out and "before ->" in out
    ckpt = torch.load(tmp_path / "outputs/tiny_lora/checkpoints/last.ckpt", weights_only=False)
    keys = set(ckpt["state_dict"]) - {META_KEY}
    assert keys and all("lora_" in k or k.startswith("classifier.") for k in keys)
    assert (tmp_path / "outputs/tiny_lora/checkpoints/summary.json").exists()
    # Resuming from the last checkpoint continues the run instead of starting over: the first resumed
    # step is step 6, with the checkpoint's adapters in place. last.ckpt here is LastCheckpoint's
    # end-of-fit save, and Lightning counts a fit stopped by max_steps as a finished epoch: the resumed
    # run goes on in epoch 1 (a periodic, mid-epoch save resumes mid-epoch: the kill test shows it).
    probe = assert_resumed_from(
        tmp_path / "outputs/tiny_lora/checkpoints/last.ckpt", global_step=6, epoch=1, batch=6
    )
    before_fit = PEFTCLI.before_fit

    def before_fit_with_probe(self: PEFTCLI) -> None:  # the CLI builds its Trainer itself
        self.trainer.callbacks.append(probe)
        before_fit(self)

    monkeypatch.setattr(PEFTCLI, "before_fit", before_fit_with_probe)
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


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``last.ckpt`` of the tiny LoRA recipe (hidden size 32, 6 steps)."""
    root = tmp_path_factory.mktemp("trained")
    with contextlib.chdir(root):
        main(["fit", "--config", str(CONFIGS_DIR / "tiny_lora.yaml")])
    return root / "outputs/tiny_lora/checkpoints/last.ckpt"


def test_ckpt_path_of_another_model_is_refused_naming_the_fields(
    trained_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "outputs/tiny_lora/checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(trained_ckpt, folder / "last.ckpt")
    wider = ["--model.init_args.config.hidden_size", "64", "--model.init_args.learning_rate", "0.001"]
    for ckpt in (str(folder / "last.ckpt"), "last"):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(CONFIGS_DIR / "tiny_lora.yaml"), *wider, "--ckpt_path", ckpt])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "model.init_args.config.hidden_size: config 64, checkpoint 32" in err
        assert "model.init_args.learning_rate: config 0.001, checkpoint 0.005" in err
        assert "--model_from_ckpt true" in err and "Traceback" not in err
    # A pretrained recipe with the tiny checkpoint: refused before the pretrained model is even built.
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS_DIR / "minilm_lora.yaml"),
                "--ckpt_path",
                str(folder / "last.ckpt"),
            ]
        )
    err = capsys.readouterr().err
    assert "model.init_args.model_name_or_path: config 'minilm', checkpoint None" in err
    assert "model.init_args.config.hidden_size: config None, checkpoint 32" in err
    # Asked for, the checkpoint's model is built (with a notice) and training resumes at the saved step.
    started = []
    monkeypatch.setattr(
        TextClassifier, "on_train_start", lambda self: started.append(self.trainer.global_step)
    )
    args = ["--ckpt_path", "last", "--model_from_ckpt", "true", "--trainer.max_steps", "8"]
    main(["fit", "--config", str(CONFIGS_DIR / "tiny_lora.yaml"), *wider, *args])
    assert "model.init_args.config.hidden_size: config 64, checkpoint 32" in capsys.readouterr().err
    resumed = torch.load(folder / "last.ckpt", weights_only=False)
    assert started == [6] and resumed["global_step"] == 8
    assert resumed["state_dict"]["classifier.weight"].shape == (2, 32)
    assert resumed["hyper_parameters"]["learning_rate"] == 0.005


def test_config_errors_print_the_message_alone_unless_asked_for_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = ["fit", "--config", str(CONFIGS_DIR / "tiny_lora.yaml")]
    cases = [
        (["--model.init_args.num_labels", "1"], "num_labels must be >= 2; got 1"),
        (["--trainer.max_steps", "abc"], 'Parser key "trainer.max_steps"'),
        (["--model.init_args.nonsense", "3"], "Option 'nonsense' is not accepted"),
        (
            ["--model.init_args.pooling", "max"],
            "Expected a typing.Literal['auto', 'cls', 'mean', 'last']. Got value: max",
        ),
    ]
    for extra, words in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([*recipe, *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and words in err, err
        assert "Traceback" not in err and "Subtypes:" not in err and "NoneType" not in err, err
        assert len(err.strip().splitlines()) <= 5, err
    with pytest.raises(ConfigError, match="num_labels must be >= 2"):
        main([*recipe, "--model.init_args.num_labels", "1", "--print-traceback"])
    monkeypatch.setenv("LIGHTNING_PEFT_TRACEBACK", "1")
    with pytest.raises(ConfigError, match="num_labels must be >= 2"):
        main([*recipe, "--model.init_args.num_labels", "1"])


def test_summary_json_is_written_to_a_temporary_file_and_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    renames: list[tuple[Path, Path]] = []
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr("lightning_peft.cli.os.replace", replace)
    main(["fit", "--config", str(CONFIGS_DIR / "tiny_lora.yaml"), "--trainer.max_steps", "2"])
    folder = tmp_path / "outputs/tiny_lora/checkpoints"
    ours = [(src, dst) for src, dst in renames if dst.name == "summary.json"]
    assert len(ours) == 1 and ours[0][0].parent == folder and ours[0][0].name != "summary.json"
    assert json.loads((folder / "summary.json").read_text())["trainable_params"] > 0
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "summary.json"]


# Runs a recipe and SIGKILLs itself when training reaches step KILL_AT (a real kill -9: no cleanup, no hooks).
KILLED_RUN = """
import os, signal, sys
from lightning_peft.cli import main
from lightning_peft.tasks import LastCheckpoint, TextClassifier

kill_at, step = int(sys.argv[1]), TextClassifier.training_step

def training_step(self, batch, batch_idx):
    if self.trainer.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, batch, batch_idx)

TextClassifier.training_step = training_step
main(sys.argv[2:])
"""


def _minilm_checkpointing(recipe: dict) -> None:
    """The tiny recipe with the pretrained recipes' checkpoint callbacks (monitored best included), saving
    every 3 steps instead of 50."""
    minilm = yaml.safe_load((CONFIGS_DIR / "minilm_lora.yaml").read_text())["trainer"]["callbacks"]
    saving = [cb for cb in minilm if "every_n_train_steps" in cb["init_args"] or "monitor" in cb["init_args"]]
    for cb in saving:
        cb["init_args"]["dirpath"] = "outputs/tiny_lora/checkpoints"
        if "every_n_train_steps" in cb["init_args"]:
            cb["init_args"]["every_n_train_steps"] = 3
    callbacks = recipe["trainer"]["callbacks"]
    callbacks[:] = [cb for cb in callbacks if "Checkpoint" not in cb["class_path"]] + saving
    recipe["trainer"]["max_steps"] = 40  # the bundled data has 32 batches of 16 per epoch


def test_recipe_killed_mid_epoch_resumes_from_its_last_periodic_save_and_saves_the_final_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, edit=_minilm_checkpointing)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, "7", "fit", "--config", str(recipe)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "outputs/tiny_lora/checkpoints/last.ckpt"
    assert last.is_file(), "nothing saved in the 7 steps before the kill"
    assert torch.load(last, weights_only=False)["global_step"] == 6  # mid-epoch: step 6 of 32
    started: list[int] = []
    monkeypatch.setattr(
        TextClassifier, "on_train_start", lambda self: started.append(self.trainer.global_step)
    )
    main(["fit", "--config", str(recipe), "--ckpt_path", "last", "--trainer.max_steps", "11"])
    assert started == [6]
    # 11 is no multiple of 3: the steps after the last periodic save are saved when fit ends.
    assert torch.load(last, weights_only=False)["global_step"] == 11
    summary = json.loads((last.parent / "summary.json").read_text())
    assert (
        summary["checkpoint"] == str(last.resolve())
        or Path(summary["checkpoint"]).resolve() == last.resolve()
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_keeps_an_unmonitored_last_checkpoint(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cli = PEFTCLI(model_class=None, datamodule_class=None, run=False, args=["--config", str(path)])
    saving = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    last = [cb for cb in saving if isinstance(cb, LastCheckpoint)]
    assert len(last) == 1 and last[0].monitor is None and last[0].save_last
    assert cli.trainer.checkpoint_callback is last[0]  # the summary reports last.ckpt
    text = path.read_text()
    if "every 50 steps" in text or "monitor:" in text:  # what a pretrained recipe promises
        assert last[0]._every_n_train_steps == 50
        assert all(cb.save_last is not True for cb in saving if cb is not last[0])
