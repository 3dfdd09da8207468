"""AttentionSwap: swaps in setup (before the optimizer exists), records the variant, refuses mismatches;
the PEFT callback refuses a recorded variant that the model does not run (the callback left out)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from lightning_peft import LoRAConfig
from lightning_peft.attention.swap import swap_attention, swapped
from lightning_peft.callbacks import PEFT, AttentionSwap
from lightning_peft.callbacks.attention_swap import CHECKPOINT_KEY, explain_load_error
from tests.resume import ResumedFrom


def tiny_bert() -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


class TinyClassifier(L.LightningModule):
    def __init__(self, build_in_configure_model: bool = False) -> None:
        super().__init__()
        self.build_in_configure_model = build_in_configure_model
        if not build_in_configure_model:
            self.model = tiny_bert()

    def configure_model(self) -> None:
        if self.build_in_configure_model and not hasattr(self, "model"):
            self.model = tiny_bert()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids, mask, labels = batch
        return self.model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 64, (8, 12), generator=g)
        mask = torch.ones(8, 12, dtype=torch.long)
        mask[::2, 8:] = 0
        return DataLoader(TensorDataset(ids, mask, torch.randint(0, 2, (8,), generator=g)), batch_size=4)


def fit(
    tmp_path: Path,
    module: L.LightningModule,
    callback: AttentionSwap | None,
    extra: list[L.Callback] | None = None,
    **kwargs,
) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        limit_train_batches=2,
        max_epochs=kwargs.pop("max_epochs", 1),
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=([callback] if callback else []) + (extra or []),
    )
    trainer.fit(module, **kwargs)
    return trainer


def only_checkpoint(tmp_path: Path) -> Path:
    (path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    return path


def test_swaps_in_setup_trains_variant_parameters_and_records_them(tmp_path: Path) -> None:
    module = TinyClassifier()
    callback = AttentionSwap("synthesizer", mode="random")
    variant_before = {}

    class Probe(L.Callback):
        def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            variant = pl_module.model.bert.encoder.layer[0].attention.self.attention_variant
            variant_before["logits"] = variant.random_logits.detach().clone()
            optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
            assert id(variant.random_logits) in optimized  # swapped before configure_optimizers

    trainer = L.Trainer(
        accelerator="cpu",
        limit_train_batches=2,
        max_epochs=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[callback, Probe()],
    )
    trainer.fit(module)
    report = swapped(module.model)
    assert report is not None and report.variant == "synthesizer" and callback.report is report
    variant = module.model.bert.encoder.layer[0].attention.self.attention_variant
    assert not torch.equal(variant.random_logits, variant_before["logits"])
    checkpoint = torch.load(only_checkpoint(tmp_path), weights_only=False)
    assert checkpoint[CHECKPOINT_KEY] == {"variant": "synthesizer", "options": {"mode": "random"}}
    assert any(k.endswith("attention_variant.random_logits") for k in checkpoint["state_dict"])


def test_setup_again_is_idempotent(tmp_path: Path) -> None:
    module = TinyClassifier()
    callback = AttentionSwap("synthesizer", mode="random")
    fit(tmp_path, module, callback)
    params = dict(module.named_parameters())
    callback.setup(module.trainer, module, "validate")
    assert dict(module.named_parameters()) == params


class _SeedEachStep(L.Callback):
    """Dropout draws that depend on the step only, so a resumed step draws what the uninterrupted one did."""

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        torch.manual_seed(trainer.global_step)


def test_resuming_with_the_same_variant_works(tmp_path: Path, assert_resumed_from: ResumedFrom) -> None:
    L.seed_everything(0)
    full = TinyClassifier()
    fit(tmp_path / "full", full, AttentionSwap("sliding_window", window=8), [_SeedEachStep()], max_epochs=2)
    L.seed_everything(0)
    fit(tmp_path, TinyClassifier(), AttentionSwap("sliding_window", window=8), [_SeedEachStep()])
    ckpt = only_checkpoint(tmp_path)
    probe = assert_resumed_from(ckpt, global_step=2, epoch=1, batch=0)  # 2 batches per epoch
    resumed = TinyClassifier()
    trainer = fit(
        tmp_path / "b",
        resumed,
        AttentionSwap("sliding_window", window=8),
        extra=[_SeedEachStep(), probe],
        ckpt_path=ckpt,
        max_epochs=2,
    )
    assert trainer.global_step == 4
    report = swapped(resumed.model)
    assert report is not None and report.variant == "sliding_window" and report.options == {"window": 8}
    # The second epoch ran through the window-8 variant, as the uninterrupted run's did (at length 12 a
    # window of 8 differs from dense attention, so a resumed run on dense attention would not match).
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        (AttentionSwap("sdpa"), AttentionSwap("sliding_window", window=8), "made with attention 'sdpa'"),
        (
            AttentionSwap("sliding_window", window=8),
            AttentionSwap("sliding_window", window=4),
            r"options \{'window': 8\}.*use AttentionSwap\('sliding_window', window=8\)",
        ),
        (None, AttentionSwap("sdpa"), "no AttentionSwap record.*drop the AttentionSwap callback"),
    ],
)
def test_resuming_a_checkpoint_of_another_variant_is_refused(
    tmp_path: Path, first: AttentionSwap | None, second: AttentionSwap, message: str
) -> None:
    fit(tmp_path, TinyClassifier(), first)
    with pytest.raises(ValueError, match=message):
        fit(tmp_path / "b", TinyClassifier(), second, ckpt_path=only_checkpoint(tmp_path), max_epochs=2)


def test_non_strict_only_warns(tmp_path: Path) -> None:
    fit(tmp_path, TinyClassifier(), AttentionSwap("sdpa"))
    with pytest.warns(UserWarning, match="made with attention 'sdpa'"):
        fit(
            tmp_path / "b",
            TinyClassifier(),
            AttentionSwap("sliding_window", window=8, strict=False),
            ckpt_path=only_checkpoint(tmp_path),
            max_epochs=2,
        )


def test_model_built_in_configure_model_is_swapped_right_after(tmp_path: Path) -> None:
    module = TinyClassifier(build_in_configure_model=True)
    fit(tmp_path, module, AttentionSwap("sdpa", target=lambda m: m.model))
    assert swapped(module.model) is not None


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Known variants"):
        AttentionSwap("sliding-window")
    with pytest.raises(ValueError, match=r"'backbone' of TinyClassifier is not an nn\.Module"):
        fit(tmp_path, TinyClassifier(), AttentionSwap("sdpa", target="backbone"))


def test_options_dict_for_yaml_recipes_merges_with_keywords() -> None:
    callback = AttentionSwap("reformer", options={"bucket_size": 8}, n_hashes=2)
    assert callback.record == {"variant": "reformer", "options": {"bucket_size": 8, "n_hashes": 2}}
    with pytest.raises(ValueError, match="given both"):
        AttentionSwap("reformer", options={"bucket_size": 8}, bucket_size=4)


# ------------------------------------------- evaluating a checkpoint trained with a swapped attention
class EvalClassifier(TinyClassifier):
    """A seeded TinyClassifier (the same base weights every time) with a validation loop; ``swap`` swaps
    its model by hand, as a user may do instead of using the callback. Its matrices are scaled up 10x: at
    the init scale (std 0.02) the residual stream of a one-layer model hides what attention does."""

    def __init__(self, swap: tuple[str, dict] | None = None) -> None:
        torch.manual_seed(0)
        super().__init__()
        with torch.no_grad():
            for p in self.model.parameters():
                if p.dim() > 1:
                    p.mul_(10.0)
        if swap is not None:
            swap_attention(self.model, swap[0], **swap[1])

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        ids, mask, labels = batch
        self.log("val_loss", self.model(input_ids=ids, attention_mask=mask, labels=labels).loss)

    def val_dataloader(self) -> DataLoader:
        return self.train_dataloader()


def lora() -> PEFT:
    return PEFT(LoRAConfig(r=2, alpha=4, target_modules=["query", "value"]))


def evaluate(tmp_path: Path, module: L.LightningModule, callbacks: list, ckpt_path: Path | None) -> float:
    trainer = L.Trainer(
        accelerator="cpu",
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=callbacks,
    )
    return trainer.validate(module, ckpt_path=ckpt_path, verbose=False)[0]["val_loss"]


def train_swapped(tmp_path: Path, name: str, options: dict) -> tuple[Path, float]:
    """Train with AttentionSwap + PEFT; the adapter-only checkpoint and the trained model's val loss."""
    module = EvalClassifier()
    trainer = L.Trainer(
        accelerator="cpu",
        limit_train_batches=2,
        max_epochs=2,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[AttentionSwap(name, **options), lora()],
    )
    trainer.fit(module)
    return only_checkpoint(tmp_path), trainer.validate(module, verbose=False)[0]["val_loss"]


SWAPS = [("performer", {"nb_features": 8}), ("sliding_window", {"window": 4})]


@pytest.mark.parametrize(("name", "options"), SWAPS, ids=[n for n, _ in SWAPS])
def test_evaluating_without_the_swap_is_refused_naming_the_variant_and_the_callback(
    tmp_path: Path, name: str, options: dict
) -> None:
    ckpt, _ = train_swapped(tmp_path, name, options)
    ((key, value),) = options.items()
    message = (
        rf"trained with attention '{name}' with options \{{'{key}': {value}\}}, but EvalClassifier's model "
        rf"runs its own attention \(not swapped\).*AttentionSwap\('{name}', target='model', {key}={value}\)"
    )
    with pytest.raises(ValueError, match=message):
        evaluate(tmp_path / "eval", EvalClassifier(), [lora()], ckpt)


def test_a_model_swapped_to_another_variant_is_refused_naming_both(tmp_path: Path) -> None:
    ckpt, _ = train_swapped(tmp_path, "performer", {"nb_features": 8})
    with pytest.raises(ValueError, match=r"'performer'.*runs attention 'sdpa' with options \{\}"):
        evaluate(tmp_path / "eval", EvalClassifier(swap=("sdpa", {})), [lora()], ckpt)


def test_the_callback_or_a_matching_swap_by_hand_reproduce_the_trained_model(tmp_path: Path) -> None:
    ckpt, trained_loss = train_swapped(tmp_path, "performer", {"nb_features": 8})
    with_callback = evaluate(
        tmp_path / "a", EvalClassifier(), [AttentionSwap("performer", nb_features=8), lora()], ckpt
    )
    by_hand = evaluate(tmp_path / "b", EvalClassifier(swap=("performer", {"nb_features": 8})), [lora()], ckpt)
    assert with_callback == pytest.approx(trained_loss, abs=1e-6)
    assert by_hand == pytest.approx(trained_loss, abs=1e-6)
    # What the refusal prevents: the same adapters on the model's own attention give another result.
    checkpoint = torch.load(ckpt, weights_only=False)
    del checkpoint[CHECKPOINT_KEY]  # the documented way to evaluate on another attention on purpose
    torch.save(checkpoint, tmp_path / "unrecorded.ckpt")
    own_attention = evaluate(tmp_path / "c", EvalClassifier(), [lora()], tmp_path / "unrecorded.ckpt")
    assert abs(own_attention - trained_loss) > 1e-3, (own_attention, trained_loss)


def test_a_variant_with_parameters_fails_on_unexpected_keys_naming_the_variant(tmp_path: Path) -> None:
    ckpt, _ = train_swapped(tmp_path, "linformer", {"proj_dim": 4})
    with pytest.raises(RuntimeError, match=r"Unexpected key.*attention_variant\.E") as caught:
        evaluate(tmp_path / "eval", EvalClassifier(), [lora()], ckpt)
    (note,) = caught.value.__notes__
    assert "needs attention 'linformer' with options {'proj_dim': 4}" in note
    assert "add AttentionSwap('linformer', target='model', proj_dim=4)" in note


def test_the_note_goes_to_unexpected_variant_keys_only() -> None:
    record = {"variant": "linformer", "options": {"proj_dim": 4}}
    trainer = SimpleNamespace(
        _checkpoint_connector=SimpleNamespace(_loaded_checkpoint={CHECKPOINT_KEY: record}),
        lightning_module=None,
    )
    header = "Error(s) in loading state_dict for M:\n\t"
    missing = RuntimeError(header + 'Missing key(s) in state_dict: "m.attention.self.attention_variant.E".')
    other = RuntimeError(header + 'Unexpected key(s) in state_dict: "m.classifier.weight".')
    unexpected = RuntimeError(
        header + 'Unexpected key(s) in state_dict: "m.attention.self.attention_variant.E".'
    )
    for error in (missing, other, unexpected):
        explain_load_error(trainer, error)  # type: ignore[arg-type]
    assert not hasattr(missing, "__notes__") and not hasattr(other, "__notes__")
    assert "needs attention 'linformer' with options {'proj_dim': 4}" in unexpected.__notes__[0]
