"""AdapterDrop: dropped layers have no adapter effect and no gradient, the backward stops at the lowest
adapted block, robust drops are seeded and resumable, any n at inference, bad n refused."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.layers import iter_trainable_parameters
from lightning_peft.tuners.adapterdrop import (
    AdapterDropConfig,
    AdapterDropController,
    adapted_blocks,
    drop_lowest,
    set_adapter_drop,
)
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer
from tests.models import first_output, model_inputs, perturb_trainable, tiny_model
from tests.resume import ResumedFrom


def _three_layers(seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "bert",
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return AutoModel.from_config(config).eval()


def _adapter_params(model: torch.nn.Module, block: int) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in iter_trainable_parameters(model) if f"layer.{block}." in n}


def test_specialized_drop_has_no_adapters_below_and_equals_explicit_layers() -> None:
    inputs = model_inputs("bert")
    model = _three_layers()
    changed = lp.inject(model, AdapterDropConfig(drop_layers=2))
    assert {n.split(".")[2] for n in changed} == {"2"}
    assert [i for i, _, _ in adapted_blocks(model)] == [2]
    perturb_trainable(model)
    reference = _three_layers()
    lp.inject(reference, lp.BottleneckConfig(layers=[2]))
    lp.load_trainable_state_dict(
        reference, {k: v for k, v in lp.trainable_state_dict(model).items() if "adapter_drop" not in k}
    )
    torch.testing.assert_close(first_output(model, inputs), first_output(reference, inputs), rtol=0, atol=0)


def test_backward_stops_at_the_lowest_adapted_block() -> None:
    # A tensor below the adapters that requires grad (here set by hand after injection: as modules_to_save
    # it is refused) would normally get a gradient; AdapterDrop cuts it off.
    model = _three_layers()
    lp.inject(model, AdapterDropConfig(drop_layers=1))
    model.embeddings.word_embeddings.weight.requires_grad_(True)
    first_output(model, model_inputs("bert")).sum().backward()
    assert model.embeddings.word_embeddings.weight.grad is None
    assert all(p.grad is not None for p in _adapter_params(model, 1).values())
    plain = _three_layers()
    lp.inject(plain, lp.BottleneckConfig(layers=[1, 2]))
    plain.embeddings.word_embeddings.weight.requires_grad_(True)
    first_output(plain, model_inputs("bert")).sum().backward()
    assert plain.embeddings.word_embeddings.weight.grad is not None


def test_robust_drops_vary_per_batch_are_seeded_and_give_no_gradient_below() -> None:
    def draws(seed: int) -> list[int]:
        model = _three_layers().train()
        lp.inject(model, AdapterDropConfig(robust=True, max_drop=2, seed=seed))
        controller = model.adapter_drop
        out = []
        for _ in range(12):
            model.zero_grad()
            first_output(model, model_inputs("bert")).sum().backward()
            n = controller.last_drop
            out.append(n)
            for block in range(3):
                grads = [p.grad for p in _adapter_params(model, block).values()]
                assert all((g is None) == (block < n) for g in grads), (block, n)
        return out

    first = draws(seed=1)
    assert first == draws(seed=1)
    assert set(first) == {0, 1, 2}
    assert first != draws(seed=2)


def test_any_n_at_inference_after_robust_training() -> None:
    inputs = model_inputs("bert")
    base = first_output(_three_layers(), inputs)
    model = _three_layers().train()
    lp.inject(model, AdapterDropConfig(robust=True, seed=0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    target = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(first_output(model, inputs), target).backward()
        opt.step()
    model.eval()
    outputs = []
    for n in range(4):
        set_adapter_drop(model, n)
        outputs.append(first_output(model, inputs))
    torch.testing.assert_close(outputs[3], base)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(outputs[a], outputs[b])
    set_adapter_drop(model, 1)
    with lp.disable_adapters(model):
        torch.testing.assert_close(first_output(model, inputs), base)
    torch.testing.assert_close(first_output(model, inputs), outputs[1], rtol=0, atol=0)


def test_drop_lowest_works_on_any_adapter_model() -> None:
    inputs = model_inputs("bert")
    model = tiny_model("bert")
    lp.inject(model, lp.BottleneckConfig())
    perturb_trainable(model)
    reference = tiny_model("bert")
    lp.inject(reference, lp.BottleneckConfig(layers=[1]))
    lp.load_trainable_state_dict(reference, _adapter_params(model, 1))
    with drop_lowest(model, 1):
        torch.testing.assert_close(first_output(model, inputs), first_output(reference, inputs))
    assert not torch.allclose(first_output(model, inputs), first_output(reference, inputs))


def test_dropping_more_layers_than_exist_is_refused() -> None:
    with pytest.raises(ValueError, match=r"drop_layers=2: cannot drop more layers than the model has \(2"):
        lp.inject(tiny_model("bert"), AdapterDropConfig(drop_layers=2))
    with pytest.raises(ValueError, match=r"max_drop=5: cannot drop more layers"):
        lp.inject(tiny_model("bert"), AdapterDropConfig(robust=True, max_drop=5))
    model = tiny_model("bert")
    lp.inject(model, AdapterDropConfig(robust=True))
    with pytest.raises(ValueError, match=r"cannot drop more layers .* choose 0\.\.2"):
        set_adapter_drop(model, 3)
    with pytest.raises(ValueError, match="cannot drop more layers"), drop_lowest(model, 3):
        pass
    specialized = tiny_model("bert")
    lp.inject(specialized, AdapterDropConfig())
    with pytest.raises(ValueError, match="robust=True"):
        set_adapter_drop(specialized, 1)
    with pytest.raises(ValueError, match="not layers"):
        AdapterDropConfig(layers=[1])


def _run(
    tmp_path: Path, epochs: int, ckpt_path: str | None = None, probe: L.Callback | None = None
) -> TinyClassifier:
    L.seed_everything(7)
    module = TinyClassifier()
    config = AdapterDropConfig(robust=True, seed=3, modules_to_save=["classifier"])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    callbacks = [PEFT(config), ckpt, *([probe] if probe else [])]
    trainer(tmp_path, callbacks, max_epochs=epochs).fit(module, tiny_loader(), ckpt_path=ckpt_path)
    return module


def test_robust_trainer_run_resumes_exactly(tmp_path: Path, assert_resumed_from: ResumedFrom) -> None:
    full = _run(tmp_path / "a", epochs=2)  # 6 batches per epoch
    _run(tmp_path / "b", epochs=1)
    path = tmp_path / "b" / "ckpt" / "last.ckpt"
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert saved["adapter_drop.step"].item() == 6  # PEFT injected into the whole LightningModule
    # The probe also checks the restored drop-schedule step (a buffer in the checkpoint) before training.
    probe = assert_resumed_from(path, global_step=6, epoch=1, batch=0)
    resumed = _run(tmp_path / "b", epochs=2, ckpt_path=str(path), probe=probe)
    assert isinstance(resumed.adapter_drop, AdapterDropController)
    assert resumed.adapter_drop.step.item() == full.adapter_drop.step.item() == 12
    a, b = lp.trainable_state_dict(full), lp.trainable_state_dict(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("saved", ["embeddings.word_embeddings", "encoder.layer.0.output.dense"])
def test_specialized_refuses_modules_to_save_below_the_cut(saved: str) -> None:
    model = _three_layers()
    with pytest.raises(
        ValueError, match=r"modules_to_save \['" + saved.replace(".", r"\.") + r"'\] run before"
    ):
        lp.inject(model, AdapterDropConfig(drop_layers=1, modules_to_save=[saved]))
    assert not any(isinstance(m, AdapterDropController) for m in model.modules())  # refused before injecting


def test_modules_to_save_above_the_cut_train() -> None:
    """A saved module in the lowest adapted block or after the encoder is accepted and gets a gradient."""
    model = _three_layers()
    saved = ["encoder.layer.1.output.dense", "pooler.dense"]
    lp.inject(model, AdapterDropConfig(drop_layers=1, modules_to_save=saved))
    model.train()
    model(**model_inputs("bert")).pooler_output.sum().backward()
    for name in saved:
        assert model.get_submodule(name).weight.grad.abs().sum() > 0, name


def test_robust_warns_about_modules_to_save_a_draw_can_cut_off() -> None:
    with pytest.warns(UserWarning, match=r"only train in batches whose drawn n"):
        lp.inject(
            _three_layers(), AdapterDropConfig(robust=True, modules_to_save=["encoder.layer.0.output.dense"])
        )
