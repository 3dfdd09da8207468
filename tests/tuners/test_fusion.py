"""AdapterFusion: the formula, one adapter reproduced, only fusion trains, bad fusions refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lightning_peft as lp
from lightning_peft import named
from lightning_peft.tuners.fusion import AdapterFusion, FusionConfig, fusion_weights, plot_fusion_weights
from tests.models import first_output, model_inputs, tiny_model

PFEIFFER = lp.BottleneckConfig(style="pfeiffer")


def _with_adapters(*names: str, config: lp.TunerConfig = PFEIFFER) -> torch.nn.Module:
    model = tiny_model("bert")
    g = torch.Generator().manual_seed(5)
    for name in names:
        named.add_adapter(model, name, config)
        with torch.no_grad():
            for p in named.adapter_state_dict(model, name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_one_adapter_with_all_the_weight_reproduces_it() -> None:
    inputs = model_inputs("bert")
    model = _with_adapters("a")
    named.set_active_adapters(model, "a")
    expected = first_output(model, inputs)
    lp.inject(model, FusionConfig(adapters=["a"]))
    torch.testing.assert_close(first_output(model, inputs), expected, rtol=1e-6, atol=1e-6)
    weights = fusion_weights(model)
    assert all(w == {"a": 1.0} for w in weights.values())


def test_fusion_output_equals_the_reference_formula() -> None:
    torch.manual_seed(0)
    model = _with_adapters("a", "b", "c")
    lp.inject(model, FusionConfig(temperature=0.5))
    stack = model.get_submodule("encoder.layer.1.output.dense")
    fusion = stack.fusion
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_(std=0.3)
    x = torch.randn(2, 3, 64)
    h = stack.base_layer(x)
    expected = torch.empty_like(h)
    for b in range(2):
        for t in range(3):
            ht = h[b, t]
            deltas = [stack.adapters[n](ht) - ht for n in ("a", "b", "c")]
            q = fusion.query.weight @ ht + fusion.query.bias
            scores = torch.stack([q @ (fusion.key.weight @ d + fusion.key.bias) for d in deltas]) / 0.5
            a = torch.exp(scores - scores.max()) / torch.exp(scores - scores.max()).sum()
            expected[b, t] = ht + sum(a[j] * (fusion.value.weight @ deltas[j]) for j in range(3))
    torch.testing.assert_close(stack(x), expected, rtol=1e-5, atol=1e-5)


def test_stage_two_trains_only_fusion_parameters() -> None:
    model = _with_adapters("a", "b")
    lp.inject(model, FusionConfig(adapters=["a", "b"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    fusion_params = {
        f"{name}.{local}"
        for name, m in model.named_modules()
        if isinstance(m, AdapterFusion)
        for local, _ in m.named_parameters()
    }
    assert trainable == fusion_params == set(lp.trainable_state_dict(model))
    assert len([m for m in model.modules() if isinstance(m, AdapterFusion)]) == 2
    first_output(model, model_inputs("bert")).sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable


def test_fusing_adapters_of_different_shapes_is_refused() -> None:
    model = _with_adapters("a")
    named.add_adapter(model, "h", lp.BottleneckConfig(style="houlsby"))
    with pytest.raises(
        ValueError, match=r"different shapes: 'h' sit at .*attention.output.dense.* 'a' do not"
    ):
        lp.inject(model, FusionConfig(adapters=["a", "h"]))
    with pytest.raises(ValueError, match=r"unknown adapter name\(s\) 'z'; this model has: 'a', 'h'"):
        lp.inject(_with_adapters("a", "h"), FusionConfig(adapters=["a", "z"]))
    with pytest.raises(ValueError, match="found no adapters"):
        lp.inject(tiny_model("bert"), FusionConfig())


def test_stage_one_adapters_load_by_path_and_weights_plot(tmp_path: Path) -> None:
    source = _with_adapters("sst", "nli")
    for n in ("sst", "nli"):
        named.save_adapter(source, n, tmp_path / "stage1")
    model = tiny_model("bert")
    config = FusionConfig(adapters={n: str(tmp_path / "stage1" / n) for n in ("sst", "nli")})
    lp.inject(model, config)
    for n in ("sst", "nli"):
        for key, value in named.adapter_state_dict(source, n).items():
            assert torch.equal(named.adapter_state_dict(model, n)[key], value)
    first_output(model, model_inputs("bert", batch=4))
    weights = fusion_weights(model, reset=True)
    assert list(weights) == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]
    for w in weights.values():
        assert list(w) == ["sst", "nli"] and abs(sum(w.values()) - 1.0) < 1e-5
    png = plot_fusion_weights(weights, tmp_path / "fusion.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="no saved adapter"):
        lp.inject(tiny_model("bert"), FusionConfig(adapters={"x": str(tmp_path / "missing.ckpt")}))
