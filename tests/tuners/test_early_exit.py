"""EarlyExitConfig: validation messages, injection, checkpoint state, unload."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel

import lightning_peft as lp
from lightning_peft.config import config_from_dict
from tests.models import tiny_model


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(criterion="patiense"), r"did you mean 'patience'.*'entropy', 'confidence', 'fixed'"),
        (dict(criterion="entropy"), "needs a threshold"),
        (dict(criterion="entropy", threshold=-1.0), r"outside the range.*\[0, 1.099\]"),
        (dict(criterion="entropy", threshold=1.2), "outside the range"),
        (dict(criterion="entropy", threshold=[0.1, 2.0]), "outside the range"),
        (dict(criterion="confidence", threshold=0.2), r"\[0.3333, 1\]"),
        (dict(criterion="confidence", threshold=1.5), "outside the range"),
        (dict(criterion="fixed"), "needs exit_layer"),
        (dict(patience=-1), "patience must be an int >= 0"),
        (dict(num_labels=0), "num_labels must be an int >= 1"),
        (dict(num_labels=1), "needs tau"),
        (dict(num_labels=1, criterion="entropy", threshold=0.1), "regression"),
        (dict(loss_weights="pabe"), "did you mean 'pabee'"),
        (dict(loss_weights=[0.0, 0.0]), "sum to 0"),
        (dict(training="deebert"), "needs stage2_step"),
        (dict(threshold=0.5), "not 'patience'"),
        (dict(target_modules=["query"]), "target_modules has no meaning"),
    ],
)
def test_bad_config(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lp.EarlyExitConfig(**{"num_labels": 3, **kwargs})


def test_depth_checks_at_injection() -> None:
    with pytest.raises(ValueError, match=r"patience=2 can never be reached with 2 layers.*patience <= 1"):
        lp.inject(tiny_model("bert"), lp.EarlyExitConfig(num_labels=2, patience=2))
    with pytest.raises(ValueError, match="exit_layer=3 but the model has 2 layers"):
        lp.inject(tiny_model("bert"), lp.EarlyExitConfig(num_labels=2, criterion="fixed", exit_layer=3))
    with pytest.raises(ValueError, match="3 values for 2 exits"):
        lp.inject(tiny_model("bert"), lp.EarlyExitConfig(num_labels=2, patience=1, loss_weights=[1, 1, 1]))


def test_causal_model_refused() -> None:
    with pytest.raises(ValueError, match="causal"):
        lp.inject(tiny_model("gpt2"), lp.EarlyExitConfig(num_labels=2, patience=1))


def test_encoder_decoder_refused() -> None:
    with pytest.raises(ValueError, match="encoder-decoder"):
        lp.inject(tiny_model("t5"), lp.EarlyExitConfig(num_labels=2, patience=1))


def test_unknown_family_says_how_to_register() -> None:
    config = AutoConfig.for_model(
        "mpnet",
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    with pytest.raises(ValueError, match=r"'mpnet'.*register_layout"):
        lp.inject(AutoModel.from_config(config), lp.EarlyExitConfig(num_labels=2, patience=1))


def test_inject_marks_heads_only_and_roundtrips() -> None:
    model = tiny_model("bert")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    changed = lp.inject(model, lp.EarlyExitConfig(num_labels=4, patience=1))
    assert changed == ["exit_heads"]
    trainable = lp.trainable_state_dict(model)
    assert trainable and all(k.startswith("exit_heads.") for k in trainable)
    assert len(model.exit_heads) == 2 and not model.exit_heads.training  # follows the model's eval mode
    cfg = config_from_dict(lp.get_config(model).to_dict())
    assert cfg == lp.get_config(model)
    plain = lp.unload(model, merge_weights=False)
    assert not hasattr(plain, "exit_heads")
    assert all(torch.equal(before[n], t) for n, t in plain.state_dict().items())
    with pytest.raises(ValueError, match="cannot be merged"):
        m2 = tiny_model("bert")
        lp.inject(m2, lp.EarlyExitConfig(num_labels=4, patience=1))
        lp.unload(m2)


def test_heads_follow_the_encoder_dtype_and_meta_device() -> None:
    model = tiny_model("bert").to(torch.float64)
    lp.inject(model, lp.EarlyExitConfig(num_labels=2, patience=1))
    assert all(p.dtype == torch.float64 for p in model.exit_heads.parameters())
    with torch.device("meta"):
        meta = AutoModel.from_config(tiny_model("bert").config)
    lp.inject(meta, lp.EarlyExitConfig(num_labels=2, patience=1))
    assert all(p.is_meta for p in meta.exit_heads.parameters())
