"""The unified design space: presets reproduce their named methods exactly, parallel insertion computes
``h + s Δh(x)`` from the sub-layer input, user-composed points work, BERT-base counts, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

import lightning_peft as lp
from lightning_peft.tuners.prefix import PrefixTuningConfig
from lightning_peft.tuners.unified import UnifiedConfig
from tests.models import (
    first_output,
    model_inputs,
    needs_interface,
    perturb_trainable,
    tiny_model,
    unregistered_model,
)
from tests.tuners.test_prefix import tiny_llama_lm
from tests.tuners.test_prompt import padded_inputs, tiny_gpt2_lm


@pytest.mark.parametrize(
    ("preset", "named"),
    [
        ("adapter", lp.BottleneckConfig(style="houlsby")),
        ("pfeiffer", lp.BottleneckConfig(style="pfeiffer")),
        ("lora", lp.LoRAConfig(r=8, alpha=8)),
        pytest.param("prefix", PrefixTuningConfig(), marks=needs_interface("bert")),
    ],
)
def test_preset_equals_the_named_method(preset: str, named: lp.TunerConfig) -> None:
    ours = tiny_model("bert")
    lp.inject(ours, UnifiedConfig(preset=preset))
    perturb_trainable(ours, scale=0.3)
    reference = tiny_model("bert")
    lp.inject(reference, named)
    lp.load_trainable_state_dict(reference, lp.trainable_state_dict(ours))  # same names, same shapes
    inputs = padded_inputs("bert")
    torch.testing.assert_close(first_output(ours, inputs), first_output(reference, inputs), rtol=0, atol=0)


def test_parallel_adapter_reads_the_ffn_input() -> None:
    model = tiny_model("bert")
    lp.inject(model, UnifiedConfig(preset="scaled_parallel"))
    perturb_trainable(model, scale=0.3)
    layer = model.encoder.layer[0]
    seen: dict[str, torch.Tensor] = {}
    layer.intermediate.register_forward_hook(lambda _m, a, _o: seen.update(x=a[0]))
    layer.register_forward_hook(lambda _m, _a, o: seen.update(out=o[0] if isinstance(o, tuple) else o))
    model(**model_inputs("bert"))
    x, wrapper = seen["x"], layer.output.dense
    branch = wrapper.adapter
    delta = branch.up(branch.act(branch.down(x))) * 4.0  # s = 4
    expected = layer.output.LayerNorm(wrapper.base_layer(layer.intermediate(x)) + delta + x)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)


def test_user_composed_gated_parallel_adapter_at_attention() -> None:
    config = UnifiedConfig(
        points=[
            {
                "form": "bottleneck",
                "at": "attention",
                "insertion": "parallel",
                "composition": "gated_add",
                "bottleneck_size": 4,
            },
            {"form": "bottleneck", "at": "ffn", "insertion": "sequential", "composition": "gated_add"},
        ]
    )
    assert config.identity_at_init
    base_out = first_output(tiny_model("gpt2"), model_inputs("gpt2"))
    model = tiny_model("gpt2")
    lp.inject(model, config)
    torch.testing.assert_close(first_output(model, model_inputs("gpt2")), base_out, rtol=0, atol=0)
    perturb_trainable(model, scale=0.3)
    out = first_output(model, model_inputs("gpt2"))
    assert not torch.allclose(out, base_out)
    out.sum().backward()
    gates = [n for n, p in model.named_parameters() if "gate" in n]
    assert len(gates) == 2 * 2 * 2 and all(model.get_parameter(n).grad is not None for n in gates)


def test_mam_generates_on_decoders_with_cache() -> None:
    for make in (tiny_gpt2_lm, tiny_llama_lm):
        model = make()
        lp.inject(model, UnifiedConfig(points=[dict(p, bottleneck_size=4) for p in _mam_points()]))
        perturb_trainable(model, scale=0.3)
        inputs = model_inputs("gpt2", batch=2, length=4)
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(**inputs, **kw), model.generate(**inputs, **kw, use_cache=False))


def _mam_points() -> list[dict]:
    from lightning_peft.tuners.unified import PRESETS

    return PRESETS["mam"]


@needs_interface("bert")
def test_bert_base_counts() -> None:
    def count(config: UnifiedConfig) -> int:
        with torch.device("meta"):
            model = BertModel(BertConfig())
        lp.inject(model, config)
        return lp.param_summary(model).trainable

    assert count(UnifiedConfig(preset="parallel")) == 7_091_712
    assert count(UnifiedConfig(preset="mam")) == 30 * 12 * 2 * 768 + 12 * (2 * 512 * 768 + 512 + 768)
    assert count(UnifiedConfig(preset="adapter")) == 1_789_056


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="conflict"):
        UnifiedConfig(preset="mam", points=[{"form": "bottleneck", "at": "ffn", "insertion": "parallel"}])
    with pytest.raises(ValueError, match="conflicting design points"):
        UnifiedConfig(
            points=[
                *_mam_points(),
                {
                    "form": "prefix",
                    "at": "attention_heads",
                    "insertion": "parallel",
                    "composition": "gated_add",
                },
            ]
        )
    with pytest.raises(ValueError, match="preset='madx' is not valid"):
        UnifiedConfig(preset="madx")
    with pytest.raises(ValueError, match="form='prefix' is defined"):
        UnifiedConfig(points=[{"form": "prefix", "at": "ffn", "insertion": "sequential"}])
    with pytest.raises(ValueError, match="needs composition='scaled_add'"):
        UnifiedConfig(points=[{"form": "bottleneck", "at": "ffn", "insertion": "parallel", "scale": 2.0}])
    with pytest.raises(ValueError, match="unknown field"):
        UnifiedConfig(points=[{"form": "bottleneck", "at": "ffn", "insertion": "parallel", "size": 2}])
    with pytest.raises(ValueError, match="insertion must be 'parallel'"):
        UnifiedConfig(points=[{"form": "bottleneck", "at": "attention_heads", "insertion": "sequential"}])
    with pytest.raises(ValueError, match=r"no registered layout.*register_layout"):
        lp.inject(unregistered_model(), UnifiedConfig(points=[MULTI_HEAD]))
    with pytest.raises(ValueError, match=r"bottleneck_size must be > 0"):
        UnifiedConfig(points=[{**_mam_points()[0], "bottleneck_size": 0}])


MULTI_HEAD = {"form": "bottleneck", "at": "attention_heads", "insertion": "parallel", "bottleneck_size": 3}


@pytest.mark.parametrize("composition", ["add", "gated_add"])
def test_multi_head_parallel_adapter_is_the_per_head_formula(composition: str) -> None:
    """BERT layer 0 by hand: out = LN(W_o [c_1 + Δ_1(x); c_2 + Δ_2(x)] + b_o + x), with per head i
    Δ_i(x) = σ(g_i(x)) (relu(x A_i^T + a_i) U_i + u_i)."""
    model = tiny_model("bert")
    lp.inject(model, UnifiedConfig(points=[{**MULTI_HEAD, "composition": composition}]))
    perturb_trainable(model, scale=0.3)
    attention = model.encoder.layer[0].attention
    seen: dict[str, torch.Tensor] = {}
    attention.self.register_forward_hook(lambda _m, a, o: seen.update(x=a[0], context=o[0]))
    attention.output.register_forward_hook(lambda _m, _a, o: seen.update(out=o))
    model(**padded_inputs("bert"))
    x, context, branch = seen["x"], seen["context"], attention.output.dense.adapter
    deltas = []
    for i in range(2):  # 2 heads, 16 dims each, bottleneck 3 per head
        rows = slice(3 * i, 3 * (i + 1))
        z = torch.relu(x @ branch.down.weight[rows].T + branch.down.bias[rows])  # (B, T, 3)
        delta = z @ branch.up_weight[i] + branch.up_bias[i]  # (B, T, 16)
        if composition == "gated_add":
            delta = delta * torch.sigmoid(x @ branch.gate.weight[i] + branch.gate.bias[i])[..., None]
        deltas.append(delta)
    dense = attention.output.dense.base_layer
    expected = attention.output.LayerNorm(dense(context + torch.cat(deltas, dim=-1)) + x)
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)
    with lp.disable_adapters(model):
        base = first_output(model, padded_inputs("bert"))
    torch.testing.assert_close(base, first_output(tiny_model("bert"), padded_inputs("bert")), rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: tiny_model("bert"), tiny_gpt2_lm, tiny_llama_lm])
def test_multi_head_parallel_adapter_starts_as_identity_and_trains(make) -> None:
    config = UnifiedConfig(points=[MULTI_HEAD])
    assert config.identity_at_init
    inputs = model_inputs("gpt2", batch=2, length=5)
    model = make()
    lp.inject(model, config)
    torch.testing.assert_close(first_output(model, inputs), first_output(make(), inputs), rtol=0, atol=0)
    first_output(model, inputs).sum().backward()
    ups = [p for n, p in model.named_parameters() if n.endswith("up_weight")]
    assert len(ups) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ups)
    if hasattr(model, "generate"):  # decoders: the captured input follows the KV cache step by step
        perturb_trainable(model, scale=0.3)
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(**inputs, **kw), model.generate(**inputs, **kw, use_cache=False))


@needs_interface("bert")
def test_multi_head_parallel_adapter_bert_base_count_and_with_prefix() -> None:
    with torch.device("meta"):
        model = BertModel(BertConfig())
    lp.inject(model, UnifiedConfig(points=[{**MULTI_HEAD, "bottleneck_size": 30}]))
    # per layer: down 768 -> 12 * 30 (+ bias), up 12 x (30 -> 64) (+ bias)
    assert lp.param_summary(model).trainable == 12 * (768 * 360 + 360 + 12 * 30 * 64 + 12 * 64) == 3_607_776
    # Default width: d // reduction_factor split over the heads (768 // 16 // 12 = 4 per head).
    default = tiny_model("bert")
    lp.inject(
        default, UnifiedConfig(points=[{k: v for k, v in MULTI_HEAD.items() if k != "bottleneck_size"}])
    )
    assert default.encoder.layer[0].attention.output.dense.adapter.m == 1  # 32 // 16 // 2
    # Prefix tuning and the multi-head adapter both modify the heads, in different forms: they compose.
    both = tiny_model("bert")
    prefix = {"form": "prefix", "at": "attention_heads", "insertion": "parallel", "composition": "gated_add"}
    lp.inject(both, UnifiedConfig(points=[{**prefix, "bottleneck_size": 2}, MULTI_HEAD]))
    assert lp.param_summary(both).trainable == 2 * 2 * 2 * 32 + 2 * (32 * 6 + 6 + 2 * 3 * 16 + 2 * 16)


@pytest.mark.parametrize("stack", ["encoder", "decoder"])
def test_parallel_adapter_on_t5_reads_each_stacks_ffn_input(stack: str) -> None:
    """Encoder and decoder blocks share block numbers: each adapter must read its own block's FFN input."""
    model = tiny_model("t5")
    lp.inject(model, UnifiedConfig(preset="scaled_parallel"))
    perturb_trainable(model, scale=0.3)
    ff = getattr(model, stack).block[1].layer[-1]  # T5LayerFF: h + DenseReluDense(LayerNorm(h))
    seen: dict[str, torch.Tensor] = {}
    ff.DenseReluDense.register_forward_hook(lambda _m, a, _o: seen.update(x=a[0]))
    ff.register_forward_hook(lambda _m, a, o: seen.update(h=a[0], out=o))
    model(**model_inputs("t5"))
    x, wrapper = seen["x"], ff.DenseReluDense.wo
    dense = ff.DenseReluDense
    branch = wrapper.adapter
    delta = branch.up(branch.act(branch.down(x))) * 4.0  # s = 4, from the FFN's input x
    expected = seen["h"] + wrapper.base_layer(dense.act(dense.wi(x))) + delta
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not hasattr(__import__("sys").modules[type(tiny_model("t5")).__module__], "ALL_ATTENTION_FUNCTIONS"),
    reason="this transformers runs T5 attention inline (no prefix keys)",
)
def test_mam_on_t5_trains_and_generates_with_cache() -> None:
    from tests.tuners.test_prompt import tiny_t5_lm

    model = tiny_t5_lm()
    lp.inject(model, UnifiedConfig(points=[dict(p, bottleneck_size=4) for p in _mam_points()]))
    perturb_trainable(model, scale=0.3)
    inputs = model_inputs("t5")
    labels = inputs.pop("decoder_input_ids").contiguous()
    model(**inputs, labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    enc = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    kw = dict(max_new_tokens=4, do_sample=False)
    model.eval()
    assert torch.equal(model.generate(**enc, **kw), model.generate(**enc, **kw, use_cache=False))
