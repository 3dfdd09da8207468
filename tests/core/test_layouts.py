"""The model-layout registry, family by family: every named path exists with the right type, and the
methods that place themselves from it (LoRA defaults, Houlsby, AdapterDrop, attention swapping) work."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel

import lightning_peft as lp
from lightning_peft.attention import swap_attention
from lightning_peft.attention.interface import routes_through_interface
from lightning_peft.layouts import (
    BLOCK_PARTS,
    BlockLayout,
    ModelLayout,
    StackLayout,
    available_layouts,
    find_stacks,
    get_layout,
    register_layout,
    resolve_path,
)
from lightning_peft.layouts import base as layout_registry
from lightning_peft.targeting import linear_types
from lightning_peft.tuners.adapterdrop import set_adapter_drop
from tests.models import VOCAB, perturb_trainable, unregistered_model

_BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_SEQ2SEQ = dict(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, decoder_start_token_id=0)
#: Tiny config fields per registered family (a new built-in layout needs a line here).
TINY: dict[str, dict] = {
    "bert": _BASE,
    "roberta": {**_BASE, "pad_token_id": 1, "max_position_embeddings": 66},
    "xlm-roberta": {**_BASE, "pad_token_id": 1, "max_position_embeddings": 66},
    "camembert": {**_BASE, "pad_token_id": 1, "max_position_embeddings": 66},
    "electra": {**_BASE, "embedding_size": 32},
    "albert": {**_BASE, "embedding_size": 16},
    "distilbert": dict(dim=32, hidden_dim=64, n_layers=2, n_heads=2),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0),
    "llama": {**_BASE, "num_key_value_heads": 2},
    "mistral": {**_BASE, "num_key_value_heads": 2, "sliding_window": None},
    "qwen2": {**_BASE, "num_key_value_heads": 2},
    "t5": _SEQ2SEQ,
    "mt5": _SEQ2SEQ,
    "bart": dict(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    ),
}
FAMILIES = available_layouts()


def build(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModel.from_config(AutoConfig.for_model(family, vocab_size=VOCAB, **TINY[family])).eval()


def inputs(family: str) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if get_layout(build(family)).encoder_decoder:
        batch["decoder_input_ids"] = ids[:, :3]
    return batch


def output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_every_family_has_a_tiny_config() -> None:
    assert set(FAMILIES) == set(TINY), "add a tiny config for each registered family"
    assert {"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "albert", "gpt2"} <= set(
        FAMILIES
    )
    assert {"llama", "mistral", "qwen2", "t5", "mt5", "bart"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_named_path_exists_with_the_right_type(family: str) -> None:
    model = build(family)
    layout = get_layout(model)
    stacks = find_stacks(model)
    assert [s.layout for s in stacks] == list(layout.stacks)
    assert {s.role for s in stacks} == (
        {"encoder", "decoder"} if layout.encoder_decoder else {stacks[0].role}
    )
    lin = linear_types()
    for stack in stacks:
        assert isinstance(stack.blocks, nn.ModuleList) and len(stack.blocks) >= 1
        block = stack.layout.block
        for b in stack.blocks:
            attention = b.get_submodule(block.attention)
            assert type(attention).__name__ in block.attention_classes
            for proj in (block.query, block.key, block.value):
                assert isinstance(attention.get_submodule(proj), lin)
            for part in BLOCK_PARTS:
                path = resolve_path(b, getattr(block, part))
                assert path is not None, f"{family}: {part} {getattr(block, part)!r} missing"
                module = b.get_submodule(path)
                if part.endswith("norm"):
                    assert "norm" in type(module).__name__.lower(), (part, type(module))
                elif part != "attention":
                    assert isinstance(module, (*lin, nn.Module)) and any(isinstance(module, t) for t in lin)
            if block.cross_attention:
                assert type(b.get_submodule(block.cross_attention)).__name__ in block.attention_classes
    hf = model.base_model if hasattr(model, "base_model") else model
    embeddings = hf.get_submodule(layout.embeddings)
    assert any(isinstance(m, nn.Embedding) for m in embeddings.modules())
    assert stacks[-1].causal == (family in ("gpt2", "llama", "mistral", "qwen2", "t5", "mt5", "bart"))


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_defaults_and_houlsby_place_themselves(family: str) -> None:
    batch = inputs(family)
    expected = output(build(family), batch)
    lora = build(family)
    names = lp.inject(lora, lp.LoRAConfig())
    assert names and all(n.rsplit(".", 1)[-1] in get_layout(lora).lora_targets for n in names)
    torch.testing.assert_close(output(lora, batch), expected, rtol=0, atol=1e-6)
    houlsby = build(family)
    names = lp.inject(houlsby, lp.BottleneckConfig(style="houlsby", reduction_factor=4))
    blocks = sum(len(s.blocks) for s in find_stacks(houlsby))
    assert len(names) == 2 * blocks
    torch.testing.assert_close(output(houlsby, batch), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapterdrop_dropping_every_depth_gives_the_base_model(family: str) -> None:
    batch = inputs(family)
    expected = output(build(family), batch)
    model = build(family)
    lp.inject(model, lp.AdapterDropConfig(robust=True, reduction_factor=4))
    perturb_trainable(model, scale=0.5)
    assert not torch.allclose(output(model, batch), expected, atol=1e-4)
    depth = max(len(s.blocks) for s in find_stacks(model))
    set_adapter_drop(model, depth)
    torch.testing.assert_close(output(model, batch), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_swapping_in_dense_sdpa_keeps_the_outputs(family: str) -> None:
    model = build(family)
    batch = inputs(family)
    expected = output(model, batch)
    if get_layout(model).encoder_decoder:
        with pytest.raises(ValueError, match="encoder-decoder"):
            swap_attention(model, "sdpa")
        return
    stack = find_stacks(model)[0]
    attention = stack.blocks[0].get_submodule(stack.layout.block.attention)
    if not routes_through_interface(attention) and family not in ("bert", "roberta"):
        # transformers 4.57 computes these families' attention inline: refused, not silently half-swapped
        with pytest.raises(ValueError, match="AttentionInterface"):
            swap_attention(model, "sdpa")
        return
    if isinstance(getattr(model.config, "sliding_window", None), int):
        with pytest.raises(ValueError, match="sliding_window = None"):
            swap_attention(model, "sdpa")
        model.config.sliding_window = None
    report = swap_attention(model, "sdpa")
    assert len(report.modules) == sum(len(s.blocks) for s in find_stacks(model))
    torch.testing.assert_close(output(model, batch), expected, rtol=1e-4, atol=1e-5)


def test_adapterdrop_on_t5_switches_decoder_adapters_with_the_decoder_blocks() -> None:
    """Regression: the decoder's adapters were filed under the encoder block's hooks, so dropping every
    depth still left the decoder adapted. Oracle: the same model with those blocks' adapters switched off
    by hand."""
    batch = inputs("t5")
    base = output(build("t5"), batch)
    model = build("t5")
    lp.inject(model, lp.AdapterDropConfig(robust=True, reduction_factor=4))
    perturb_trainable(model, scale=0.5)
    set_adapter_drop(model, 2)
    torch.testing.assert_close(output(model, batch), base, rtol=0, atol=1e-6)
    set_adapter_drop(model, 1)
    dropped = output(model, batch)
    set_adapter_drop(model, 0)
    wrappers = [
        m
        for n, m in model.named_modules()
        if n.startswith(("encoder.block.0.", "decoder.block.0.")) and hasattr(m, "base_layer")
    ]
    assert len(wrappers) == 4  # Houlsby: attention and FFN outputs of encoder.block.0 and decoder.block.0
    for w in wrappers:
        w.disabled = True
    torch.testing.assert_close(dropped, output(model, batch), rtol=0, atol=0)
    assert not torch.allclose(dropped, base, atol=1e-4)


def test_camembert_gets_lora_by_default() -> None:
    """Regression: LoRA's own default-target table lacked CamemBERT while Houlsby's had it."""
    model = build("camembert")
    names = lp.inject(model, lp.LoRAConfig())
    assert names == [f"encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]


def test_unknown_family_says_how_to_register() -> None:
    with pytest.raises(ValueError, match=r"no registered layout.*register_layout"):
        lp.inject(unregistered_model(), lp.LoRAConfig())


def test_a_user_registers_their_own_architecture_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    model = unregistered_model()  # OPT: not built in
    block = BlockLayout(
        attention="self_attn",
        attention_classes=("OPTAttention",),
        query="q_proj",
        key="k_proj",
        value="v_proj",
        attention_output="self_attn.out_proj",
        attention_norm="self_attn_layer_norm",
        ffn_input="fc1",
        ffn_output="fc2",
        ffn_norm="final_layer_norm",
    )
    layout = ModelLayout(
        family="opt",
        stacks=(StackLayout(role="decoder", path="decoder.layers", block=block, causal=True),),
        embeddings="decoder.embed_tokens",
        lora_targets=("q_proj", "v_proj"),
    )
    monkeypatch.setitem(
        layout_registry._LAYOUTS, "opt", layout
    )  # register_layout("opt", layout), undone after
    assert get_layout(model) is layout
    with pytest.raises(ValueError, match="registered already"):
        register_layout("opt", ModelLayout(family="x", stacks=(), embeddings="e", lora_targets=()))
    assert len(lp.inject(model, lp.LoRAConfig())) == 4
    houlsby = unregistered_model()
    assert len(lp.inject(houlsby, lp.BottleneckConfig(style="houlsby"))) == 4


def test_layout_found_inside_a_wrapper() -> None:
    holder = nn.Module()
    holder.backbone = build("bert")
    stacks = find_stacks(holder)
    assert [s.name for s in stacks] == ["backbone.encoder.layer"]
