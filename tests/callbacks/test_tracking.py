"""Tracking: what the PEFT callback logs, read back from a real offline W&B run and from CSV/TensorBoard."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import lightning_peft as lp
from lightning_peft.callbacks import PEFT, AttentionSwap
from lightning_peft.callbacks.adapter_checkpoint import META_KEY
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer

wandb = pytest.importorskip("wandb")


def lora() -> lp.LoRAConfig:
    return lp.LoRAConfig(r=2, alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])


def wandb_records(path: Path) -> Iterator[object]:
    """Records of a ``run-<id>.wandb`` file: a 7-byte ``:W&B`` header, then LevelDB-log style 32 KiB
    blocks of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) holding
    serialised ``wandb_internal_pb2.Record`` protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a chunk header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _finished_records(path: Path, timeout: float = 30.0) -> list:
    """The run file's records once its final ``exit`` record is on disk: ``finish()`` can return while
    wandb-core is still writing the last records."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout} s")
        time.sleep(0.1)


def _offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **peft_kw) -> dict:
    from lightning.pytorch.loggers import WandbLogger

    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_model = peft_kw.pop("log_model", False)
    # Lightning refuses log_model with offline=True; WANDB_MODE=offline keeps that run offline too.
    logger = WandbLogger(
        offline=not log_model, save_dir=str(tmp_path), project="tracking", log_model=log_model
    )
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    swap = AttentionSwap("sliding_window", target="backbone", options={"window": 4})
    module = TinyClassifier()
    trainer(tmp_path, [swap, PEFT(lora(), **peft_kw), ckpt], max_steps=2, logger=logger).fit(
        module, tiny_loader()
    )
    logger.experiment.finish()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    config, artifacts = {}, []
    for record in _finished_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "artifact":
            artifacts.append(record.artifact)
    return {
        "config": config,
        "artifacts": artifacts,
        "module": module,
        "ckpt": tmp_path / "ckpt" / "last.ckpt",
    }


def test_wandb_offline_run_holds_config_sizes_and_the_adapter_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _offline_run(tmp_path, monkeypatch)
    config, ckpt = run["config"], run["ckpt"]
    summary = lp.param_summary(run["module"])
    assert config["peft/trainable"] == summary.trainable and config["peft/total"] == summary.total
    assert config["peft/config"] == lora().to_dict()
    assert config["peft/attention"] == {"variant": "sliding_window", "options": {"window": 4}}
    assert config["peft/checkpoint_bytes"] == ckpt.stat().st_size
    assert config["peft/checkpoint"] == str(ckpt)

    (artifact,) = run["artifacts"]
    assert artifact.type == "model" and artifact.name.startswith("adapter-")
    assert set(artifact.aliases) == {"latest", "step-2"}
    assert json.loads(artifact.metadata)["peft_config"]["method"] == "lora"
    (entry,) = artifact.manifest.contents
    md5 = base64.b64encode(hashlib.md5(ckpt.read_bytes()).digest()).decode()
    assert (entry.path, entry.size, entry.digest) == ("last.ckpt", ckpt.stat().st_size, md5)
    # What was logged is the adapter-only checkpoint.
    keys = set(torch.load(ckpt, weights_only=False)["state_dict"]) - {META_KEY}
    assert keys == set(lp.trainable_state_dict(run["module"]))


def test_artifact_logging_is_opt_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _offline_run(tmp_path, monkeypatch, log_checkpoint_artifact=False)
    assert run["artifacts"] == []
    assert run["config"]["peft/checkpoint_bytes"] == run["ckpt"].stat().st_size


def test_lightning_log_model_is_reused_not_doubled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _offline_run(tmp_path, monkeypatch, log_model="all")
    (artifact,) = run["artifacts"]  # Lightning's own, of the same adapter-only file
    assert artifact.name.startswith("model-")
    (entry,) = artifact.manifest.contents
    assert entry.size == run["ckpt"].stat().st_size


def _fit_with(tmp_path: Path, logger) -> TinyClassifier:
    module = TinyClassifier()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer(tmp_path, [PEFT(lora()), ckpt], max_steps=2, logger=logger).fit(module, tiny_loader())
    logger.finalize("success")
    return module


def test_csv_logger_gets_the_same_fields(tmp_path: Path) -> None:
    logger = CSVLogger(save_dir=str(tmp_path), name="csv")
    module = _fit_with(tmp_path, logger)
    hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["peft/trainable"] == lp.param_summary(module).trainable
    assert hparams["peft/config"]["r"] == 2 and hparams["peft/attention"] is None
    assert hparams["peft/checkpoint_bytes"] == (tmp_path / "ckpt" / "last.ckpt").stat().st_size


def test_tensorboard_logger_gets_the_same_fields(tmp_path: Path) -> None:
    # tensorboard is in the test extra: this test runs in CI, it does not skip.
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb")
    module = _fit_with(tmp_path, logger)
    # Every hparams session record in the event file, in order. TensorBoard's HPARAMS tab shows the first
    # (fit start: summary and config); the checkpoint size follows in a record of its own.
    (events,) = Path(logger.log_dir).glob("events.out.tfevents.*")
    records = [
        plugin_data_pb2.HParamsPluginData.FromString(
            v.metadata.plugin_data.content
        ).session_start_info.hparams
        for event in EventFileLoader(str(events)).Load()
        for v in event.summary.value
        if v.tag == "_hparams_/session_start_info"
    ]
    assert len(records) == 2, records
    shown, later = records
    assert shown["peft/trainable"].number_value == lp.param_summary(module).trainable
    assert shown["peft/total"].number_value == lp.param_summary(module).total
    assert shown["peft/config/r"].number_value == 2 and shown["peft/config/method"].string_value == "lora"
    assert shown["peft/attention"].string_value == "None"
    assert later["peft/checkpoint_bytes"].number_value == (tmp_path / "ckpt" / "last.ckpt").stat().st_size
