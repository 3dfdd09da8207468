"""K-Adapter: the base output is untouched, each knowledge adapter trains alone and independently, the
concatenation feeds the head, Trainer runs save adapter-only checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.callbacks.adapter_checkpoint import META_KEY, AdapterCheckpointError
from lightning_peft.tuners.kadapter import (
    KAdapterConfig,
    add_kadapter,
    default_layers,
    kadapter_features,
    kadapter_output,
    list_kadapters,
    train_kadapter,
)
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer
from tests.models import model_inputs, perturb_trainable, tiny_model
from tests.resume import ResumedFrom

H = 32


def _config(name: str, **kw) -> KAdapterConfig:
    return KAdapterConfig(name=name, hidden=16, num_transformer_layers=2, dropout=0.0, **kw)


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_base_outputs_untouched_and_concat_shape() -> None:
    inputs = model_inputs("bert", batch=3, length=5)
    base = tiny_model("bert")(**inputs, output_hidden_states=True)
    model = tiny_model("bert")
    reads = lp.inject(model, _config("fact", adapter_layers=[0, 1]))
    assert reads == ["encoder.layer.0", "encoder.layer.1"]
    add_kadapter(model, _config("ling"))
    perturb_trainable(model)
    out = model(**inputs, output_hidden_states=True)
    assert out.last_hidden_state.shape == (3, 5, H * 3)
    torch.testing.assert_close(out.last_hidden_state[..., :H], base.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(out.pooler_output, base.pooler_output, rtol=0, atol=0)
    for mine, theirs in zip(out.hidden_states, base.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    feats = kadapter_features(model)
    assert list(feats) == list_kadapters(model) == ["fact", "ling"]
    assert torch.equal(out.last_hidden_state[..., H : 2 * H], feats["fact"])
    assert torch.equal(out.last_hidden_state[..., 2 * H :], feats["ling"])
    assert torch.equal(kadapter_output(model), out.last_hidden_state)
    # The frozen base parameters are exactly the original ones.
    ref = dict(tiny_model("bert").named_parameters())
    for n, p in model.named_parameters():
        if n in ref:
            assert torch.equal(p, ref[n]) and not p.requires_grad, n


def test_concat_output_false_leaves_the_model_output_bitwise() -> None:
    inputs = model_inputs("bert")
    expected = tiny_model("bert")(**inputs).last_hidden_state
    model = tiny_model("bert")
    lp.inject(model, _config("fact", concat_output=False))
    perturb_trainable(model)
    out = model(**inputs).last_hidden_state
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert kadapter_output(model).shape == (2, 7, 2 * H)
    assert not torch.allclose(kadapter_features(model)["fact"], expected)


def test_adapter_layer_reads_its_block_plus_the_previous_adapter_layer() -> None:
    inputs = model_inputs("bert")
    model = tiny_model("bert")
    lp.inject(model, _config("fact", adapter_layers=[0, 1]))
    perturb_trainable(model)
    hidden = model(**inputs, output_hidden_states=True).hidden_states  # embeddings, block 0, block 1
    adapter = model.kadapters.adapters["fact"]
    first = adapter.layers[0](hidden[1])
    expected = adapter.layers[1](hidden[2] + first)
    torch.testing.assert_close(kadapter_features(model)["fact"], expected, rtol=1e-6, atol=1e-6)
    layer = adapter.layers[0]
    x = layer.down(hidden[1])
    for enc in layer.encoder:
        x = enc(x)
    torch.testing.assert_close(first, hidden[1] + layer.up(x))


def test_only_the_new_adapter_trains_and_adapters_are_independent() -> None:
    model = tiny_model("bert")
    lp.inject(model, _config("fact"))
    assert _trainable_names(model) == {n for n, _ in model.named_parameters() if ".adapters.fact." in n}
    add_kadapter(model, _config("ling"))
    ling = {n for n, _ in model.named_parameters() if ".adapters.ling." in n}
    assert ling and _trainable_names(model) == ling == set(lp.trainable_state_dict(model))
    # Even with every adapter parameter requiring grad, adapter 2's loss reaches neither adapter 1 nor
    # the base: there is no information flow between knowledge adapters.
    for p in model.kadapters.parameters():
        p.requires_grad_(True)
    model(**model_inputs("bert"))
    kadapter_features(model)["ling"].pow(2).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == ling
    train_kadapter(model, "fact")
    assert _trainable_names(model) == {n for n, _ in model.named_parameters() if ".adapters.fact." in n}
    train_kadapter(model, None)
    assert not _trainable_names(model)


def test_disable_adapters_and_round_trip() -> None:
    inputs = model_inputs("bert")
    expected = tiny_model("bert")(**inputs).last_hidden_state
    model = tiny_model("bert")  # in eval mode: the added adapters follow it (default dropout 0.1 is off)
    lp.inject(model, KAdapterConfig(name="fact", hidden=16))
    assert not model.kadapters.training
    perturb_trainable(model)
    tuned = model(**inputs).last_hidden_state
    assert torch.equal(model(**inputs).last_hidden_state, tuned)
    with lp.disable_adapters(model):
        torch.testing.assert_close(model(**inputs).last_hidden_state, expected, rtol=0, atol=0)
    fresh = tiny_model("bert")
    lp.inject(fresh, KAdapterConfig(name="fact", hidden=16))
    lp.load_trainable_state_dict(fresh, lp.trainable_state_dict(model))
    torch.testing.assert_close(fresh(**inputs).last_hidden_state, tuned, rtol=0, atol=0)


def test_padding_positions_do_not_reach_the_adapters() -> None:
    model = tiny_model("bert")
    lp.inject(model, _config("fact"))
    perturb_trainable(model)
    ids = model_inputs("bert")["input_ids"]
    mask = torch.ones_like(ids)
    mask[:, -2:] = 0
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ids2 = ids.clone()
    ids2[:, -2:] = 5
    b = model(input_ids=ids2, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[:, :-2], b[:, :-2])


def test_bad_configs_are_refused() -> None:
    assert default_layers(12) == [0, 5, 11] and default_layers(24) == [0, 11, 23]
    with pytest.raises(ValueError, match="not layers"):
        KAdapterConfig(layers=[1])
    with pytest.raises(ValueError, match=r"adapter_layers=\[0, 5\]: the model has 2 blocks"):
        lp.inject(tiny_model("bert"), KAdapterConfig(adapter_layers=[0, 5]))
    with pytest.raises(ValueError, match="not divisible"):
        lp.inject(tiny_model("bert"), KAdapterConfig(hidden=30, num_heads=4))
    model = tiny_model("bert")
    lp.inject(model, _config("fact"))
    with pytest.raises(ValueError, match="already exists"):
        add_kadapter(model, _config("fact"))
    with pytest.raises(ValueError, match=r"unknown knowledge adapter 'x'; this model has: \['fact'\]"):
        train_kadapter(model, "x")
    with pytest.raises(ValueError, match="unknown field"):
        lp.config_from_dict({"method": "kadapter", "hiden": 8})


class _KAdapterClassifier(TinyClassifier):
    """The head reads the concatenation of the base output and one knowledge adapter."""

    def _build(self) -> None:
        super()._build()
        torch.manual_seed(self.seed + 2)
        self.classifier = nn.Linear(2 * H, 2)


def test_trainer_run_saves_adapter_only_checkpoint(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = _KAdapterClassifier()
    base_before = {n: p.detach().clone() for n, p in module.backbone.named_parameters()}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    config = _config("fact", modules_to_save=["classifier"])
    adapter_before = None

    class Snap(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            nonlocal adapter_before
            adapter_before = {k: v.clone() for k, v in lp.trainable_state_dict(pl_module).items()}

    trainer(tmp_path, [PEFT(config), ckpt, Snap()], max_steps=4).fit(module, tiny_loader())
    trained = lp.trainable_state_dict(module)
    assert adapter_before is not None and trained.keys() == adapter_before.keys()
    assert all(not torch.equal(trained[k], adapter_before[k]) for k in trained if k.endswith("down.weight"))
    for n, p in module.backbone.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    keys = {k for k, v in saved.items() if isinstance(v, torch.Tensor)}
    assert keys == set(trained)
    assert all(".kadapters.adapters.fact." in k or k.startswith("classifier.") for k in keys)
    fresh = _KAdapterClassifier()
    lp.inject(fresh, config)
    lp.load_trainable_state_dict(fresh, {k: saved[k] for k in keys})
    module.eval(), fresh.eval()
    ids = next(iter(tiny_loader()))[0]
    torch.testing.assert_close(fresh(ids), module(ids), rtol=0, atol=0)


# -- two knowledge adapters through the PEFT callback ------------------------------------------------------
FACT = _config("fact", modules_to_save=["classifier"])
LING = _config("ling", adapter_layers=[1])


class _TwoKAdapterClassifier(TinyClassifier):
    """The head reads the base output and two knowledge adapters."""

    def _build(self) -> None:
        super()._build()
        torch.manual_seed(self.seed + 2)
        self.classifier = nn.Linear(3 * H, 2)


def _two_kadapters() -> _TwoKAdapterClassifier:
    module = _TwoKAdapterClassifier()
    lp.inject(module, FACT)
    perturb_trainable(module)  # stands for the phase that trained "fact": frozen from here on
    add_kadapter(module, LING)  # not described by the callback's config
    return module


def _fit_two(
    root: Path, epochs: int, ckpt_path: str | None = None, probe: L.Callback | None = None
) -> _TwoKAdapterClassifier:
    """Train "ling" (and the head) for ``epochs``; a resumed run starts from a fresh module that has
    only what PEFT(FACT) injects, so the second adapter must come from the checkpoint."""
    L.seed_everything(7)
    module = _TwoKAdapterClassifier() if ckpt_path else _two_kadapters()
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)
    callbacks = [PEFT(FACT), ckpt, *([probe] if probe else [])]
    trainer(root, callbacks, max_epochs=epochs).fit(module, tiny_loader(), ckpt_path=ckpt_path)
    return module


def test_peft_callback_restores_every_kadapter_and_resumes_bitwise(
    tmp_path: Path, assert_resumed_from: ResumedFrom
) -> None:
    full = _fit_two(tmp_path / "a", epochs=3)
    first = _fit_two(tmp_path / "b", epochs=1)
    path = tmp_path / "b" / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    saved = checkpoint["state_dict"]
    record = checkpoint[META_KEY]["records"][0]  # one record per tuner member: K-Adapter is the only one
    assert [d["name"] for d in record["adapters"]] == ["fact", "ling"] and record["trainable"] == "ling"
    frozen = {k for k in saved if ".kadapters.adapters.fact." in k}
    assert frozen, "the frozen knowledge adapter is trained state: the checkpoint keeps it"
    assert all(torch.equal(saved[k], first.state_dict()[k]) for k in frozen)

    probe = assert_resumed_from(path, global_step=6, epoch=1, batch=0)  # 6 batches per epoch
    resumed = _fit_two(tmp_path / "b", epochs=3, ckpt_path=str(path), probe=probe)
    assert list_kadapters(resumed) == ["fact", "ling"]
    assert _trainable_names(resumed) == _trainable_names(full)
    assert all(".adapters.ling." in n or n.startswith("classifier.") for n in _trainable_names(resumed))
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full.eval(), resumed.eval()
    ids = next(iter(tiny_loader()))[0]
    torch.testing.assert_close(resumed(ids), full(ids), rtol=0, atol=0)

    fresh = _TwoKAdapterClassifier()  # loading (not resuming) restores both adapters as well
    trainer(tmp_path / "c", [PEFT(FACT)]).validate(fresh, tiny_loader(), ckpt_path=str(path), verbose=False)
    assert list_kadapters(fresh) == ["fact", "ling"]
    for k, v in resumed.state_dict().items():  # last.ckpt now holds the end of the resumed run
        assert torch.equal(fresh.state_dict()[k], v), k


def test_kadapters_that_do_not_extend_the_recorded_ones_are_refused(tmp_path: Path) -> None:
    _fit_two(tmp_path, epochs=1)
    other = _TwoKAdapterClassifier()
    lp.inject(other, FACT)
    add_kadapter(other, _config("other"))
    with pytest.raises(AdapterCheckpointError, match=r"\['fact', 'ling'\] do not extend this model's"):
        trainer(tmp_path, [PEFT(FACT)]).validate(
            other, tiny_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"), verbose=False
        )
