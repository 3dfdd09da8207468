"""Multi-task inference: several named adapters on one batch equal running the tasks one by one."""

from __future__ import annotations

import pytest
import torch

import lightning_peft as lp
from lightning_peft import named
from lightning_peft.multitask import parallel_adapters, run_parallel, run_sequential
from lightning_peft.tuners.adapterdrop import drop_lowest
from lightning_peft.tuners.fusion import add_fusion
from tests.models import VOCAB, tiny_model

SIZES = {"sst": 2, "nli": 1, "qa": 3}


def _model() -> torch.nn.Module:
    model = tiny_model("bert")
    named.add_adapter(model, "sst", lp.BottleneckConfig(style="pfeiffer"))
    named.add_adapter(model, "nli", lp.BottleneckConfig(style="houlsby", bottleneck_size=4))
    named.add_adapter(model, "qa", lp.BottleneckConfig(style="pfeiffer", layers=[1]))  # none in block 0
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in SIZES:
            for p in named.adapter_state_dict(model, name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    named.set_active_adapters(model, "sst")
    return model


def _inputs() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, n in SIZES.items():
        ids = torch.randint(2, VOCAB, (n, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # padded rows too
        out[name] = {"input_ids": ids, "attention_mask": mask}
    return out


def _assert_same(parallel: torch.Tensor, sequential: torch.Tensor, mask: torch.Tensor) -> None:
    """Bitwise at every real token. At padding positions (which no real token attends to) the base model
    alone already differs by ~1 ulp between a batch of 1 and a larger batch (its attention-mask path), so
    there the check is to float tolerance."""
    real = mask.bool()
    torch.testing.assert_close(parallel[real], sequential[real], rtol=0, atol=0)
    torch.testing.assert_close(parallel, sequential, rtol=1e-6, atol=1e-6)


def test_parallel_equals_one_task_at_a_time_exactly() -> None:
    model, inputs = _model(), _inputs()
    sequential = run_sequential(model, inputs)
    parallel = run_parallel(model, inputs)
    assert list(parallel) == list(SIZES)
    for name in SIZES:
        assert parallel[name].shape == (SIZES[name], 9, 32)
        _assert_same(parallel[name], sequential[name], inputs[name]["attention_mask"])
    # The tasks really differ, and the model's own active adapter set is restored afterwards.
    assert not torch.allclose(sequential["sst"][:1], run_sequential(model, {"nli": inputs["sst"]})["nli"][:1])
    assert named.active_adapters(model) == ["sst"]
    assert all(stack.active_names == ("sst",) * ("sst" in stack.adapters) for _, stack in named.stacks(model))


def test_parallel_composes_with_adapter_drop() -> None:
    model, inputs = _model(), _inputs()
    with drop_lowest(model, 1):
        sequential = run_sequential(model, inputs)
        parallel = run_parallel(model, inputs)
    full = run_parallel(model, inputs)
    for name in SIZES:
        _assert_same(parallel[name], sequential[name], inputs[name]["attention_mask"])
    # "qa" has no adapter in block 0, so dropping block 0 changes the others only.
    assert torch.equal(parallel["qa"], full["qa"])
    assert not torch.allclose(parallel["sst"], full["sst"])


def test_bad_splits_are_refused() -> None:
    model, inputs = _model(), _inputs()
    known = r"unknown: \['pos'\]; this model has: \['sst', 'nli', 'qa'\]"
    with pytest.raises(ValueError, match=known), parallel_adapters(model, [("sst", 1), ("pos", 1)]):
        pass
    rows = "has 2 rows but the task sizes"
    with pytest.raises(ValueError, match=rows), parallel_adapters(model, [("sst", 1), ("nli", 2)]):
        model(**inputs["sst"])
    assert all(stack.active_names == ("sst",) * ("sst" in stack.adapters) for _, stack in named.stacks(model))
    named.add_adapter(model, "sst2", lp.BottleneckConfig(style="pfeiffer"))
    add_fusion(model, ["sst", "sst2"])
    with pytest.raises(ValueError, match="AdapterFusion"):
        run_parallel(model, inputs)
