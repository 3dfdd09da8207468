"""Exit heads stacked with other tuners (``inject(model, [tuner, EarlyExitConfig(...)])``) and with a swapped
attention: every exit reads the block outputs the tuned model's own forward computes, and batched exits
still equal one sample at a time."""

from __future__ import annotations

import pytest
import torch

import lightning_peft as lp
from lightning_peft.attention import swap_attention
from lightning_peft.early_exit import exit_logits, hidden_states, predict
from tests.early_exit.helpers import DEPTH, encoder, padded_batch
from tests.models import needs_interface, perturb_trainable

TUNERS = {
    "lora": lambda: lp.LoRAConfig(r=4, target_modules=["query", "value"]),
    "houlsby": lambda: lp.BottleneckConfig(style="houlsby"),
    "bitfit": lambda: lp.BitFitConfig(),
    "prefix": lambda: lp.PrefixTuningConfig(num_virtual_tokens=3),
    "prompt": lambda: lp.PromptTuningConfig(num_virtual_tokens=3),
}


def _stacked(name: str) -> torch.nn.Module:
    model = encoder("bert", 0)
    lp.inject(model, [TUNERS[name](), lp.EarlyExitConfig(num_labels=3, patience=1)])
    perturb_trainable(model, scale=0.3)  # trained-looking tuner and heads
    return model


def _check_against_forward(model: torch.nn.Module, batch: dict, virtual: int = 0) -> None:
    with torch.no_grad():
        ours, mask = hidden_states(model, **batch)
        theirs = model(**batch, output_hidden_states=True).hidden_states[1:]
    keep = mask.bool()
    assert mask.shape[1] == batch["attention_mask"].shape[1] + virtual
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        want = model.exit_heads[-1](theirs[-1], mask)
    torch.testing.assert_close(exit_logits(model, **batch)[-1], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name",
    ["lora", "houlsby", "bitfit", pytest.param("prefix", marks=needs_interface("bert")), "prompt"],
)
def test_stacked_tuner_exits_read_the_tuned_blocks(name: str) -> None:
    model = _stacked(name)
    trained = lp.trainable_state_dict(model)
    assert any(k.startswith("exit_heads.") for k in trained) and any(
        not k.startswith("exit_heads.") for k in trained
    )
    batch = padded_batch(batch=6, seed=2)
    _check_against_forward(model, batch, virtual=3 if name == "prompt" else 0)
    model.double()
    with torch.no_grad():
        all_logits = exit_logits(model, **batch)
    ent = -(torch.softmax(all_logits, -1) * torch.log_softmax(all_logits, -1)).sum(-1)[:-1]
    cfg = lp.EarlyExitConfig(num_labels=3, criterion="entropy", threshold=float(ent.median()))
    logits, layer = predict(model, cfg, **batch)
    for b in range(6):
        n = int(batch["attention_mask"][b].sum())
        l1, e1 = predict(model, cfg, **{k: v[b : b + 1, :n] for k, v in batch.items()})
        assert int(e1) == int(layer[b])
        torch.testing.assert_close(l1[0], logits[b], atol=1e-6, rtol=0)


def test_swapped_attention() -> None:
    model = encoder("bert", 0)
    swap_attention(model, "sliding_window", window=2)
    lp.inject(
        model, [lp.LoRAConfig(r=4, target_modules=["query", "value"]), lp.EarlyExitConfig(num_labels=3)]
    )
    perturb_trainable(model, scale=0.3)
    _check_against_forward(model, padded_batch(batch=6, seed=2))
    assert len(model.exit_heads) == DEPTH


def test_stack_unloads_to_the_base() -> None:
    base = encoder("bert", 0)
    model = _stacked("lora")
    plain = lp.unload(model, merge_weights=False)
    assert not hasattr(plain, "exit_heads")
    batch = padded_batch(batch=3)
    torch.testing.assert_close(plain(**batch).last_hidden_state, base(**batch).last_hidden_state)
