"""Bad inputs to the data module, the task model, the recipes' callbacks, checkpoint files and the CLI: one
table of (input, exception type, words the message must contain). Each message names the problem and, where
there is one, the fix. README.md states how many inputs the table holds."""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from lightning_peft.cli import ConfigError, main
from lightning_peft.export_cli import CheckpointFileError, read_checkpoint
from lightning_peft.tasks import LastCheckpoint, TextClassificationData, TextClassifier
from lightning_peft.tasks.data import read_records

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny_lora.yaml"
BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "vocab_size": 128}  # fmt: skip


class Case(NamedTuple):
    name: str
    run: Callable[[Path], Any]  # gets a fresh folder to write files into
    error: type[BaseException]
    words: tuple[str, ...]


def _file(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _data(folder: Path, name: str, content: str | bytes, **kwargs: Any) -> None:
    """Build the data module on one training file and read it."""
    data = TextClassificationData(str(_file(folder, name, content)), tokenizer="whitespace", **kwargs)
    data.setup("fit")


def _checkpoint(folder: Path) -> bytes:
    """The bytes of a small, sound torch.save checkpoint."""
    torch.save({"state_dict": {"w": torch.arange(2000.0)}, "global_step": 3}, folder / "sound.ckpt")
    return (folder / "sound.ckpt").read_bytes()


def _broken(folder: Path, how: str) -> Path:
    good = _checkpoint(folder)
    content = {"truncated": good[: len(good) // 2], "empty": b"", "random": bytes(range(7, 256)) * 8}[how]
    return _file(folder, f"{how}.ckpt", content)


def _other_model_ckpt(folder: Path) -> Path:
    """A checkpoint whose stored model hyperparameters differ from tiny_lora.yaml's model (hidden size)."""
    hparams = {"_class_path": "lightning_peft.tasks.TextClassifier", "config": {**BERT, "vocab_size": 512},
               "num_labels": 2, "learning_rate": 5.0e-3}  # fmt: skip
    torch.save({"state_dict": {}, "hyper_parameters": hparams, "global_step": 1}, folder / "other.ckpt")
    return folder / "other.ckpt"


def _foreign_model_ckpt(folder: Path) -> Path:
    hparams = {"_class_path": "torch.nn.Linear", "in_features": 3, "out_features": 2}
    torch.save({"state_dict": {}, "hyper_parameters": hparams, "global_step": 1}, folder / "foreign.ckpt")
    return folder / "foreign.ckpt"


def _unsafe_ckpt(folder: Path) -> Path:
    torch.save({"state_dict": {}, "extra": Fraction(1, 3)}, folder / "objects.ckpt")
    return folder / "objects.ckpt"


def _fit(*args: str) -> None:
    main(["fit", "--config", str(TINY), *args])


def _export(checkpoint: Path) -> None:
    main(
        ["export", "--checkpoint", str(checkpoint), "--base", "minilm", "--module", "backbone", "--out", "o"]
    )


CSV_HEAD = "text,label\n"
CASES = [
    # Data files (TextClassificationData, read_records)
    Case(
        "empty label cell",
        lambda d: _data(d, "t.csv", CSV_HEAD + "good,pos\nbad,\n"),
        ValueError,
        ("t.csv:3", "empty 'label' value", "fill it in or remove the row"),
    ),
    Case(
        "blank label in jsonl",
        lambda d: _data(d, "t.jsonl", '{"text": "a", "label": " "}\n'),
        ValueError,
        ("t.jsonl:1", "empty 'label'"),
    ),
    Case(
        "null text in jsonl",
        lambda d: _data(d, "t.jsonl", '{"text": null, "label": 1}\n'),
        ValueError,
        ("t.jsonl:1", "no 'text' value"),
    ),
    Case(
        "latin-1 csv",
        lambda d: _data(d, "t.csv", (CSV_HEAD + "caf\xe9,pos\n").encode("latin-1")),
        ValueError,
        ("t.csv:2", "not utf-8 text", "byte 0xe9", "encoding='latin-1'"),
    ),
    Case(
        "unknown encoding",
        lambda d: _data(d, "t.csv", CSV_HEAD + "a,b\n", encoding="klingon"),
        ValueError,
        ("t.csv", "unknown encoding 'klingon'"),
    ),
    Case(
        "missing file",
        lambda d: read_records(d / "nope.csv"),
        FileNotFoundError,
        ("data file not found", "nope.csv"),
    ),
    Case(
        "unknown extension",
        lambda d: read_records(_file(d, "t.parquet", b"")),
        ValueError,
        ("unknown file type '.parquet'", "supported: .csv, .jsonl"),
    ),
    Case(
        "invalid json line",
        lambda d: _data(d, "t.jsonl", '{"text": "a", "label": 1}\n{oops\n'),
        ValueError,
        ("t.jsonl:2", "not valid JSON"),
    ),
    Case(
        "json line not an object",
        lambda d: _data(d, "t.jsonl", "[1, 2]\n"),
        ValueError,
        ("t.jsonl:1", "expected a JSON object per line, got list"),
    ),
    Case("header only", lambda d: _data(d, "t.csv", CSV_HEAD), ValueError, ("t.csv", "has no rows")),
    Case(
        "missing text column",
        lambda d: _data(d, "t.csv", "review,label\na,b\n"),
        ValueError,
        ("no column 'text'", "columns present: ['review', 'label']", "text_column"),
    ),
    Case(
        "label outside label_names",
        lambda d: _data(d, "t.csv", CSV_HEAD + "a,maybe\n", label_names=["no", "yes"]),
        ValueError,
        ("t.csv:2", "label 'maybe'", "label_names"),
    ),
    Case(
        "negative integer label",
        lambda d: _data(d, "t.csv", CSV_HEAD + "a,-1\nb,0\n"),
        ValueError,
        ("integer labels must be >= 0",),
    ),
    Case(
        "max_length 1",
        lambda d: TextClassificationData(tokenizer="whitespace", max_length=1),
        ValueError,
        ("max_length must be >= 2",),
    ),
    Case(
        "batch_size 0",
        lambda d: TextClassificationData(tokenizer="whitespace", batch_size=0),
        ValueError,
        ("batch_size >= 1",),
    ),
    # The task model and the recipes' checkpoint callback
    Case(
        "pooling max",
        lambda d: TextClassifier(config=BERT, pooling="max"),
        ValueError,
        ("pooling must be 'auto', 'cls', 'mean' or 'last'",),
    ),
    Case(
        "one label",
        lambda d: TextClassifier(config=BERT, num_labels=1),
        ValueError,
        ("num_labels must be >= 2",),
    ),
    Case(
        "warmup_ratio 1",
        lambda d: TextClassifier(config=BERT, warmup_ratio=1.0),
        ValueError,
        ("warmup_ratio must be in [0, 1)",),
    ),
    Case(
        "dropout 1",
        lambda d: TextClassifier(config=BERT, dropout=1.0),
        ValueError,
        ("dropout must be in [0, 1)",),
    ),
    Case(
        "config and pretrained",
        lambda d: TextClassifier("minilm", config=BERT),
        ValueError,
        ("either model_name_or_path", "or config"),
    ),
    Case(
        "LastCheckpoint every 0 steps",
        lambda d: LastCheckpoint(every_n_train_steps=0),
        ValueError,
        ("every_n_train_steps must be >= 1",),
    ),
    # Checkpoint files
    Case(
        "truncated checkpoint",
        lambda d: read_checkpoint(_broken(d, "truncated")),
        CheckpointFileError,
        ("truncated.ckpt", "is truncated", "use an earlier checkpoint"),
    ),
    Case(
        "empty checkpoint",
        lambda d: read_checkpoint(_broken(d, "empty")),
        CheckpointFileError,
        ("empty.ckpt", "is empty (0 bytes)"),
    ),
    Case(
        "random bytes",
        lambda d: read_checkpoint(_broken(d, "random")),
        CheckpointFileError,
        ("random.ckpt", "is not a PyTorch checkpoint"),
    ),
    Case(
        "missing checkpoint",
        lambda d: read_checkpoint(d / "gone.ckpt"),
        CheckpointFileError,
        ("gone.ckpt", "does not exist"),
    ),
    Case(
        "folder as checkpoint",
        lambda d: read_checkpoint(d),
        CheckpointFileError,
        ("does not exist (it is a folder)",),
    ),
    Case(
        "tensor file as checkpoint",
        lambda d: torch.save(torch.ones(2), d / "t.pt") or read_checkpoint(d / "t.pt"),
        CheckpointFileError,
        ("t.pt", "holds a Tensor, not a checkpoint dict"),
    ),
    Case(
        "objects safe loading refuses",
        lambda d: read_checkpoint(_unsafe_ckpt(d), trust_hint="add --x"),
        CheckpointFileError,
        ("objects.ckpt", "beyond tensors and plain data", "if you trust the file, add --x"),
    ),
    # The CLI: one message and exit status 2 (words are looked for in stderr)
    Case(
        "fit --ckpt_path truncated",
        lambda d: _fit("--ckpt_path", str(_broken(d, "truncated"))),
        SystemExit,
        ("lightning-peft: error:", "truncated.ckpt", "is truncated"),
    ),
    Case(
        "fit --ckpt_path empty",
        lambda d: _fit("--ckpt_path", str(_broken(d, "empty"))),
        SystemExit,
        ("empty.ckpt", "is empty"),
    ),
    Case(
        "fit --ckpt_path missing",
        lambda d: _fit("--ckpt_path", str(d / "gone.ckpt")),
        SystemExit,
        ("gone.ckpt", "does not exist"),
    ),
    Case(
        "fit --ckpt_path of another model",
        lambda d: _fit("--ckpt_path", str(_other_model_ckpt(d))),
        SystemExit,
        ("model.init_args.config.num_hidden_layers: config 2, checkpoint 1", "--model_from_ckpt true"),
    ),
    Case(
        "fit --ckpt_path with unsafe objects",
        lambda d: _fit("--ckpt_path", str(_unsafe_ckpt(d))),
        SystemExit,
        ("objects.ckpt", "beyond tensors and plain data", "--weights_only false"),
    ),
    Case(
        "fit --ckpt_path of a foreign model class",
        lambda d: _fit("--ckpt_path", str(_foreign_model_ckpt(d))),
        SystemExit,
        ("foreign.ckpt", "do not fit this command's model options", "torch.nn.Linear"),
    ),
    Case(
        "fit bad num_labels",
        lambda d: _fit("--model.init_args.num_labels", "1"),
        SystemExit,
        ("lightning-peft: error: num_labels must be >= 2",),
    ),
    Case(
        "fit bad type",
        lambda d: _fit("--trainer.max_steps", "abc"),
        SystemExit,
        ('"trainer.max_steps"', "Expected a <class 'int'>. Got value: abc"),
    ),
    Case(
        "fit unknown model option",
        lambda d: _fit("--model.init_args.nonsense", "3"),
        SystemExit,
        ("Option 'nonsense' is not accepted",),
    ),
    Case(
        "recipe with a bad tuner value",
        lambda d: main(
            ["fit", "--config", str(_file(d, "r0.yaml", TINY.read_text().replace(" r: 4", " r: 0")))]
        ),
        SystemExit,
        ("LoRAConfig.r must be > 0, got 0",),
    ),
    Case(
        "fit missing config file",
        lambda d: main(["fit", "--config", str(d / "nope.yaml")]),
        SystemExit,
        ("nope.yaml",),
    ),
    Case(
        "export truncated",
        lambda d: _export(_broken(d, "truncated")),
        SystemExit,
        ("lightning-peft export: error:", "truncated.ckpt", "is truncated"),
    ),
    Case(
        "export random bytes",
        lambda d: _export(_broken(d, "random")),
        SystemExit,
        ("random.ckpt", "is not a PyTorch checkpoint"),
    ),
    Case(
        "export a checkpoint without adapters",
        lambda d: _export(d / "sound.ckpt" if _checkpoint(d) else d),
        SystemExit,
        ("sound.ckpt", "is not an adapter-only checkpoint"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_clear_error(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(case.error) as info:
        case.run(tmp_path)
    if case.error is SystemExit:
        assert info.value.code == 2
        message = capsys.readouterr().err
        assert "Traceback" not in message
    else:
        message = str(info.value)
    for words in case.words:
        assert words in message, f"{words!r} not in:\n{message}"


def test_readme_states_how_many_bad_inputs_are_tested() -> None:
    counts = re.findall(r"(\d+) bad inputs tested", (ROOT / "README.md").read_text())
    assert counts == [str(len(CASES))]


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointFileError, ValueError)
