"""Dynamic per-sample exits against oracles: the rule applied post hoc (written here from the papers),
each sample run alone, a model truncated to k blocks, and Hugging Face's own forward."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoModel

import lightning_peft as lp
from lightning_peft.early_exit import exit_logits, hidden_states, predict
from tests.early_exit.helpers import DEPTH, FAMILIES, encoder, padded_batch, with_exits


def oracle(cfg: lp.EarlyExitConfig, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each criterion as the papers state it, one sample at a time, on all-exit logits (L, B, C)."""
    L, B, _ = logits.shape
    outs, layers = [], []
    for b in range(B):
        z = logits[:, b].double()
        probs = torch.softmax(z, -1)
        chosen = None
        if cfg.criterion == "patience":
            count, prev = 0, None
            for i in range(L):
                pred = int(z[i].argmax())
                count = count + 1 if prev is not None and pred == prev else 0
                prev = pred
                if cfg.patience > 0 and count == cfg.patience:
                    chosen = (i, i + 1)
                    break
        elif cfg.criterion == "entropy":
            thr = cfg.threshold if isinstance(cfg.threshold, list) else [cfg.threshold] * L
            thr = thr + thr[-1:] * (L - len(thr))
            for i in range(L):
                ent = -sum(float(p) * math.log(float(p)) for p in probs[i] if p > 0)
                if ent < thr[i]:
                    chosen = (i, i + 1)
                    break
        elif cfg.criterion == "confidence":
            conf = probs.max(-1).values
            fired = [i for i in range(L) if conf[i] >= cfg.threshold]
            if fired:
                chosen = (fired[0], fired[0] + 1)
            elif cfg.fallback == "most_confident":
                chosen = (int(conf.argmax()), L)
        else:
            chosen = (cfg.exit_layer - 1, cfg.exit_layer)
        if chosen is None:
            chosen = (L - 1, L)
        outs.append(logits[chosen[0], b])
        layers.append(chosen[1])
    return torch.stack(outs), torch.tensor(layers)


def _between(values: torch.Tensor, q: float) -> float:
    """A threshold strictly between two distinct observed values near quantile ``q`` (no ties)."""
    v = torch.unique(values.flatten().double())
    k = min(int(q * (len(v) - 1)), len(v) - 2)
    return float((v[k] + v[k + 1]) / 2)


def _configs(all_logits: torch.Tensor) -> list[lp.EarlyExitConfig]:
    probs = torch.softmax(all_logits.double(), -1)
    ent = -(probs * probs.log()).sum(-1)[:-1]
    conf = probs.max(-1).values[:-1]
    per_layer = [_between(ent[i], 0.5) for i in range(DEPTH - 1)]
    return [
        lp.EarlyExitConfig(num_labels=3, criterion="patience", patience=1),
        lp.EarlyExitConfig(num_labels=3, criterion="patience", patience=2),
        lp.EarlyExitConfig(num_labels=3, criterion="entropy", threshold=_between(ent, 0.4)),
        lp.EarlyExitConfig(num_labels=3, criterion="entropy", threshold=per_layer),
        lp.EarlyExitConfig(num_labels=3, criterion="confidence", threshold=_between(conf, 0.7)),
        lp.EarlyExitConfig(
            num_labels=3, criterion="confidence", threshold=_between(conf, 0.7), fallback="last"
        ),
        lp.EarlyExitConfig(num_labels=3, criterion="fixed", exit_layer=2),
    ]


@pytest.mark.parametrize("seed", [0, 1])
def test_dynamic_equals_post_hoc_rule(seed: int) -> None:
    """float64: the only differences left are the method's (float32 rounds differently shaped matmuls of
    the shrinking batch at ~1e-6 relative)."""
    model = with_exits("bert", seed).double()
    batch = padded_batch(batch=16, seed=seed + 5)
    with torch.no_grad():
        all_logits = exit_logits(model, **batch)
    spread = 0
    for cfg in _configs(all_logits):
        want_logits, want_layer = oracle(cfg, all_logits)
        logits, layer = predict(model, cfg, **batch)
        assert torch.equal(layer, want_layer), cfg
        torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=0)
        spread += len(set(layer.tolist())) > 1
    assert spread >= 5  # most rules make samples of this batch leave at different layers


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_sample_at_a_time(family: str) -> None:
    """In float64, so that a 1e-6 difference can only come from the method (padding leaking, a wrong
    sample scattered back), not from float32 rounding of differently shaped matmuls (~1e-6 relative)."""
    model = with_exits(family, 2).double()
    n_samples = 10 if family == "bert" else 6
    batch = padded_batch(batch=n_samples, seed=7)
    with torch.no_grad():
        all_logits = exit_logits(model, **batch)
    configs = _configs(all_logits)
    for cfg in configs[:5] if family == "bert" else [configs[1], configs[2]]:  # other families: 2 rules
        logits, layer = predict(model, cfg, **batch)
        for b in range(n_samples):
            n = int(batch["attention_mask"][b].sum())
            one = {k: v[b : b + 1, :n] for k, v in batch.items()}
            l1, e1 = predict(model, cfg, **one)
            assert int(e1) == int(layer[b]), (cfg.criterion, b)
            torch.testing.assert_close(l1[0], logits[b], atol=1e-6, rtol=0)


def test_never_firing_returns_last_exit_exactly(batch: dict[str, torch.Tensor]) -> None:
    model = with_exits("bert", 0, scale=0.5)
    with torch.no_grad():
        last = exit_logits(model, **batch)[-1]
    for cfg in (
        lp.EarlyExitConfig(num_labels=3, criterion="entropy", threshold=0.0),
        lp.EarlyExitConfig(num_labels=3, criterion="confidence", threshold=1.0, fallback="last"),
        lp.EarlyExitConfig(num_labels=3, criterion="patience", patience=0),
    ):
        logits, layer = predict(model, cfg, **batch)
        assert torch.equal(layer, torch.full_like(layer, DEPTH))
        assert torch.equal(logits, last), cfg


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [1, 3])
def test_exit_at_k_equals_truncated_model_and_head(family: str, k: int, batch: dict) -> None:
    model = with_exits(family, 4, criterion="fixed", exit_layer=k)
    full = encoder(family, 4)
    key = "n_layers" if family == "distilbert" else "num_hidden_layers"
    truncated = AutoModel.from_config(replace_config(full.config, **{key: k}), attn_implementation="eager")
    truncated.load_state_dict(
        {n: t for n, t in full.state_dict().items() if n in truncated.state_dict()}, strict=True
    )
    truncated.eval()
    with torch.no_grad():
        hidden = truncated(**batch).last_hidden_state
        want = model.exit_heads[k - 1](hidden, batch["attention_mask"])
    logits, layer = predict(model, **batch)
    assert torch.equal(layer, torch.full_like(layer, k))
    torch.testing.assert_close(logits, want, atol=1e-6, rtol=1e-6)


def replace_config(config, **changes):
    new = config.__class__.from_dict({**config.to_dict(), **changes})
    return new


@pytest.mark.parametrize("family", FAMILIES)
def test_block_outputs_equal_hugging_face_hidden_states(family: str, batch: dict) -> None:
    model = with_exits(family, 0)
    with torch.no_grad():
        ours, _ = hidden_states(model, **batch)
        theirs = model(**batch, output_hidden_states=True).hidden_states[1:]
    assert len(ours) == len(theirs) == DEPTH
    m = batch["attention_mask"].bool()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-5)


def test_sdpa_and_eager_give_the_same_exits(batch: dict) -> None:
    model = with_exits("bert", 0)
    sdpa = encoder("bert", 0)
    sdpa.set_attn_implementation("sdpa")
    lp.inject(sdpa, replace(model.exit_heads.config))
    sdpa.exit_heads.load_state_dict(model.exit_heads.state_dict())
    cfg = lp.EarlyExitConfig(num_labels=3, criterion="patience", patience=1)
    a, la = predict(model, cfg, **batch)
    b, lb = predict(sdpa, cfg, **batch)
    assert torch.equal(la, lb)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_predict_removes_samples_that_left(batch: dict) -> None:
    """The blocks after an exit see only the samples still running, with trailing padding trimmed."""
    model = with_exits("bert", 0)
    cfg = lp.EarlyExitConfig(num_labels=3, criterion="fixed", exit_layer=DEPTH)
    seen: list[tuple[int, ...]] = []
    hooks = [
        b.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[:2])))
        for b in model.encoder.layer
    ]
    _, layer = predict(model, **batch)
    seen.clear()
    with torch.no_grad():
        all_logits = exit_logits(model, **batch)
    ent = -(torch.softmax(all_logits, -1) * torch.log_softmax(all_logits, -1)).sum(-1)
    cfg = lp.EarlyExitConfig(num_labels=3, criterion="entropy", threshold=_between(ent[:-1], 0.5))
    seen.clear()
    _, layer = predict(model, cfg, **batch)
    for h in hooks:
        h.remove()
    for i, (rows, cols) in enumerate(seen):
        running = layer >= i + 1
        assert rows == int(running.sum())
        assert cols == int(batch["attention_mask"][running].sum(1).max())


def test_albert_with_several_groups_and_inner_layers(batch: dict) -> None:
    """ALBERT's general sharing: 2 groups of 2 inner layers over 4 depths, as AlbertTransformer picks them."""
    model = encoder("albert", 0, num_hidden_groups=2, inner_group_num=2)
    lp.inject(model, lp.EarlyExitConfig(num_labels=3, patience=1))
    with torch.no_grad():
        ours, _ = hidden_states(model, **batch)
        theirs = model(**batch, output_hidden_states=True).hidden_states[1:]
    assert len(ours) == DEPTH and len(theirs) == 2 * DEPTH  # transformers records every inner layer
    m = batch["attention_mask"].bool()
    for a, b in zip(ours, theirs[1::2], strict=True):  # an exit reads the output of a whole group
        torch.testing.assert_close(a[m], b[m], atol=1e-5, rtol=1e-5)
