"""FSDP2 (``fully_shard`` under ``ModelParallelStrategy``) with 2 CPU processes (gloo) and the PEFT callback.

``fsdp2_train.py`` trains, resumes and refuses a mismatched resume in 2 processes; these tests check what
every rank saw (gathered to full tensors) and the checkpoints it wrote, for a model built in ``__init__``
(adapters injected before the user's ``configure_model`` shards it) and one built and sharded in
``configure_model`` (adapters injected after, as FSDP2 units of their own), with both checkpoint layouts of
the strategy: one file (``save_distributed_checkpoint=False``) and a distributed-checkpoint folder (its
default). A third build puts the model on the meta device (``Trainer.init_module(empty_init=True)``), as
large models are built: the strategy materialises it, the adapters must come back at their own init (LoRA a
no-op) and the base weights, loaded in ``on_fit_start``, must be the ones that train under the adapters.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.callbacks.adapter_checkpoint import META_KEY
from lightning_peft.callbacks.strategies import check_no_tensor_parallel, shard_new_adapters
from tests.callbacks.fsdp2_train import RESUME_STEPS, TRAIN_STEPS, Record, lora
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer
from tests.models import tiny_model

BLOCKS = ["backbone.encoder.layer.0", "backbone.encoder.layer.1"]


# -- one process: the FSDP2 helpers on a world of one rank ---------------------------------------------------
@pytest.fixture
def world_of_one() -> Iterator[None]:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_adapters_injected_into_a_sharded_model_become_units_per_block(world_of_one: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("data_parallel",))
    model = tiny_model("bert")
    for layer in model.encoder.layer:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    lp.inject(model, lp.LoRAConfig(r=4, target_modules=["query", "value"]))
    assert not any(isinstance(p, DTensor) for _, p in lp.layers.iter_trainable_parameters(model))
    assert shard_new_adapters(model) == 2  # one unit per block, holding its 4 lora_A / lora_B modules
    assert all(isinstance(p, DTensor) for p in model.parameters())
    units = {n for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    blocks = {"encoder.layer.0", "encoder.layer.1"}
    adapters = {f"{b}.attention.self.{p}.lora_{m}" for b in blocks for p in ("query", "value") for m in "AB"}
    assert units == {"", *blocks, *adapters}
    assert shard_new_adapters(model) == 0  # nothing left unsharded
    out = model(input_ids=torch.randint(2, 97, (2, 5))).last_hidden_state
    out.sum().backward()
    assert all(p.grad is not None for _, p in lp.layers.iter_trainable_parameters(model))


def test_tensor_parallel_parameters_are_refused(world_of_one: None) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    weight = torch.randn(4, 4)
    layer = nn.Linear(4, 4)
    layer.weight = nn.Parameter(distribute_tensor(weight, mesh["data_parallel"], [Shard(0)]))
    check_no_tensor_parallel(layer)  # FSDP2 shards over the data-parallel dimension: fine
    layer.weight = nn.Parameter(distribute_tensor(weight, mesh["tensor_parallel"], [Shard(0)]))
    with pytest.raises(NotImplementedError, match="tensor_parallel_size=1"):
        check_no_tensor_parallel(layer)


# -- two processes -------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, build: str, layout: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run fsdp2_train.py in 2 processes; the (train, resume) records of ranks 0 and 1."""
    script = Path(__file__).with_name("fsdp2_train.py")
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    run = subprocess.run(
        [sys.executable, str(script), str(out), build, layout],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    load = lambda name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in (0, 1)]  # noqa: E731
    refused = load("refused")
    for rank in refused:  # the tuner config check of the FSDP2 loader, on every rank
        assert "different tuner config" in rank["error"] and "r: 4 vs 8" in rank["error"], rank["error"]
    return load("train"), load("resume")


def _assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def _assert_trained(train: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Frozen base, trained adapters, identical on both ranks; returns the adapters after training."""
    rank0, rank1 = train
    start, end = rank0["start"], rank0["end"]
    assert rank0["grads_checked"] and rank1["grads_checked"]  # check_gradients=True ran and passed
    assert rank0["requires_grad"] == rank1["requires_grad"] == sorted(end["adapters"])
    assert len(end["adapters"]) == 10  # 8 lora_A/lora_B + classifier weight and bias
    assert all("lora_" in n or n.startswith("classifier.") for n in end["adapters"])
    # Every parameter, adapters included, is an FSDP2 shard (a replicated adapter would never be reduced).
    assert end["dtensor_params"] == sorted([*end["adapters"], *end["frozen"]])
    assert all(start["adapters"][k].shape == v.shape for k, v in end["adapters"].items())
    assert all(not torch.equal(start["adapters"][k], v) for k, v in end["adapters"].items())
    assert all(v.abs().sum() > 0 for k, v in end["adapters"].items() if "lora_B" in k)  # zero at start
    _assert_equal(end["frozen"], start["frozen"])
    _assert_equal(rank1["end"]["adapters"], end["adapters"])
    assert end["global_step"] == TRAIN_STEPS
    return end["adapters"]


def _assert_resumed(resume: list[dict[str, Any]], train: list[dict[str, Any]]) -> None:
    """Same strategy: the step, adapters and AdamW state continue exactly where training stopped."""
    for rank, trained in zip(resume, train, strict=True):
        start = rank["start"]
        assert start["global_step"] == TRAIN_STEPS and rank["end"]["global_step"] == RESUME_STEPS
        _assert_equal(start["adapters"], trained["end"]["adapters"])
        assert set(start["optimizer"]) == set(trained["end"]["adapters"])
        for name, state in trained["end"]["optimizer"].items():
            _assert_equal(start["optimizer"][name], state)  # exp_avg, exp_avg_sq and step
    _assert_equal(resume[1]["end"]["adapters"], resume[0]["end"]["adapters"])
    assert any(
        not torch.equal(resume[0]["end"]["adapters"][k], v) for k, v in train[0]["end"]["adapters"].items()
    )


def _assert_units(train: list[dict[str, Any]], build: str) -> None:
    units = train[0]["end"]["fsdp_units"]
    if build in ("init", "meta"):  # injected before configure_model: the user's calls shard them with blocks
        assert units == ["", *BLOCKS]
    else:  # injected into the sharded model: each adapter module joins its block's own adapter unit
        adapters = [
            f"{b}.attention.self.{p}.lora_{m}" for b in BLOCKS for p in ("query", "value") for m in "AB"
        ]
        assert units == sorted(["", *BLOCKS, *adapters])


def _assert_started_as_the_base(train: list[dict[str, Any]]) -> None:
    """Built on the meta device: after the strategy's materialisation and the base-weight load, the base is
    exactly the loaded model, LoRA's B is zero and the model's output is the base model's."""
    reference = {f"backbone.{n}": p.detach() for n, p in TinyClassifier().backbone.named_parameters()}
    for rank in train:
        start, outputs = rank["start"], rank["outputs"]
        frozen = {k.replace(".base_layer", ""): v for k, v in start["frozen"].items()}
        _assert_equal(frozen, reference)
        lora_b = [v for k, v in start["adapters"].items() if "lora_B" in k]
        assert len(lora_b) == 4 and not any(v.any() for v in lora_b)
        assert all(v.std() > 0.05 for k, v in start["adapters"].items() if "lora_A" in k)  # Kaiming, not 0
        assert torch.equal(outputs["tuned"], outputs["base"])  # a no-op: adapters on and off agree


def _plain_resume(tmp_path: Path, ckpt: Path, checkpoint: dict[str, Any]) -> None:
    """The FSDP2 file resumes in one plain CPU process: step, adapters and AdamW state carry over."""
    record, module = Record(), TinyClassifier()
    run = trainer(tmp_path / "single", [PEFT(lora()), record], max_steps=RESUME_STEPS, max_epochs=10)
    run.fit(module, tiny_loader(), ckpt_path=str(ckpt))
    start = record.seen["start"]
    assert start["global_step"] == TRAIN_STEPS and run.global_step == RESUME_STEPS
    _assert_equal(start["adapters"], {k: v for k, v in checkpoint["state_dict"].items() if k != META_KEY})
    saved = checkpoint["optimizer_states"][0]
    assert len(saved["state"]) == len(start["optimizer"]) == 10
    ids = saved["param_groups"][0]["params"]  # saved order = this optimizer's order
    in_order = [n for n, _ in module.named_parameters() if n in start["optimizer"]]
    for param_id, name in zip(ids, in_order, strict=True):
        _assert_equal(start["optimizer"][name], saved["state"][param_id])


@pytest.mark.slow
@pytest.mark.parametrize("build", ["init", "configure_model", "meta"])
def test_fsdp2_single_file_checkpoint(tmp_path: Path, build: str) -> None:
    """``save_distributed_checkpoint=False``: one adapter-only file, resumable sharded and in one process."""
    train, resume = _launch(tmp_path, build, "file")
    adapters = _assert_trained(train)
    _assert_units(train, build)
    if build == "meta":
        _assert_started_as_the_base(train)

    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt"] and ckpt.is_file()
    checkpoint = torch.load(ckpt, weights_only=False)
    state = checkpoint["state_dict"]
    meta = checkpoint[META_KEY]
    assert meta["config"] == lora().to_dict() and meta["fingerprint"]
    assert set(meta["fingerprint"]) == {k.replace(".base_layer", "") for k in train[0]["end"]["frozen"]}
    tensors = {k: v for k, v in state.items() if k != META_KEY}
    assert all(
        type(v) is torch.Tensor and v.numel() > 0 for v in tensors.values()
    )  # full, not DTensor shards
    _assert_equal(tensors, adapters)
    assert checkpoint["global_step"] == TRAIN_STEPS

    _assert_resumed(resume, train)
    _plain_resume(tmp_path, ckpt, checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("build", ["init", "configure_model"])
def test_fsdp2_distributed_checkpoint(tmp_path: Path, build: str) -> None:
    """``save_distributed_checkpoint=True`` (the strategy's default): a folder of adapter shards only."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    train, resume = _launch(tmp_path, build, "distributed")
    adapters = _assert_trained(train)
    _assert_units(train, build)

    folder = tmp_path / "ckpt" / "last.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "meta.pt",
    ]
    meta = torch.load(folder / "meta.pt", weights_only=False)
    assert meta["global_step"] == TRAIN_STEPS and meta[META_KEY]["config"] == lora().to_dict()
    stored = FileSystemReader(folder).read_metadata().state_dict_metadata
    shapes = {
        k.removeprefix("state_dict."): list(v.size) for k, v in stored.items() if k.startswith("state_dict.")
    }
    assert shapes == {k: list(v.shape) for k, v in adapters.items()}  # adapters only, at their full shapes
    consolidated = tmp_path / "consolidated.pt"
    dcp_to_torch_save(folder, consolidated)
    full = torch.load(consolidated, weights_only=False)
    _assert_equal(full["state_dict"], adapters)
    assert set(full["optimizer_0"]["state"]) == set(adapters)

    _assert_resumed(resume, train)
