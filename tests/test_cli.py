"""The ``lightning-peft`` CLI: every recipe in configs/ parses and instantiates; a tiny recipe trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_peft.callbacks import PEFT
from lightning_peft.callbacks.adapter_checkpoint import META_KEY
from lightning_peft.cli import PEFTCLI, main
from tests.resume import ResumedFrom

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


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
    # step is step 6 (batch 6 of epoch 0, the bundled data has more than 6 batches of 16), with the
    # checkpoint's adapters in place.
    probe = assert_resumed_from(
        tmp_path / "outputs/tiny_lora/checkpoints/last.ckpt", global_step=6, epoch=0, batch=6
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
