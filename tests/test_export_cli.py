"""``lightning-peft export`` end to end: train a tiny run, export its checkpoint, load the result without
lightning_peft (peft for the adapter folder, plain transformers for the merged model)."""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from transformers import AutoModel

import lightning_peft as lp
from lightning_peft.callbacks import PEFT
from lightning_peft.cli import main
from lightning_peft.export_cli import CheckpointFileError, read_checkpoint
from tests.lit_helpers import TinyClassifier, tiny_loader, trainer
from tests.models import tiny_model

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, TinyClassifier]:
    """A base folder, a trained adapter-only checkpoint, and the trained module (seconds)."""
    root = tmp_path_factory.mktemp("export_cli")
    tiny_model("bert", seed=0).save_pretrained(root / "base")  # TinyClassifier(seed=0)'s backbone
    module = TinyClassifier(seed=0)
    config = lp.LoRAConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_last=True, save_top_k=0)
    trainer(root, [PEFT(config), ckpt], max_steps=4).fit(module, tiny_loader())
    return root / "base", root / "ckpt" / "last.ckpt", module.eval()


def _hidden(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(2, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def _export(ckpt: Path, base: Path, out: Path, fmt: str, *extra: str) -> None:
    args = ["--checkpoint", str(ckpt), "--base", str(base), "--module", "backbone", "--format", fmt]
    main(["export", *args, "--out", str(out), *extra])


def test_export_peft_folder_loads_in_peft(run, tmp_path: Path, capsys) -> None:
    base, ckpt, module = run
    _export(ckpt, base, tmp_path / "adapter", "peft")
    assert "adapter_model.safetensors" in capsys.readouterr().out
    expected = _hidden(module.backbone)
    assert not torch.allclose(expected, _hidden(AutoModel.from_pretrained(base)), atol=1e-4)
    theirs = peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), tmp_path / "adapter").eval()
    torch.testing.assert_close(_hidden(theirs), expected, rtol=0, atol=1e-5)
    # The LightningModule's own head is kept next to it, under its LightningModule names.
    extras = load_file(tmp_path / "adapter" / "extra_tensors.safetensors")
    assert set(extras) == {"classifier.weight", "classifier.bias"}
    assert torch.equal(extras["classifier.weight"], module.classifier.weight.detach())


def test_export_merged_loads_in_plain_transformers(run, tmp_path: Path) -> None:
    base, ckpt, module = run
    _export(ckpt, base, tmp_path / "merged", "merged")
    assert not any("lora_" in k for k in load_file(tmp_path / "merged" / "model.safetensors"))
    plain = AutoModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_hidden(plain), _hidden(module.backbone), rtol=1e-5, atol=1e-5)


def test_export_refuses_another_base(run, tmp_path: Path, capsys) -> None:
    _, ckpt, _ = run
    tiny_model("bert", seed=3).save_pretrained(tmp_path / "other")
    with pytest.raises(SystemExit) as exit_info:
        _export(ckpt, tmp_path / "other", tmp_path / "out", "peft")
    assert exit_info.value.code == 2
    assert "not the model these adapters were trained on" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_wrong_module_path(run, tmp_path: Path, capsys) -> None:
    base, ckpt, _ = run
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(ckpt), "--base", str(base), "--module", "model", "--out", "x"])
    assert "Top-level names in it: ['backbone']" in capsys.readouterr().err


def _corrupt_copies(ckpt: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """Broken checkpoint files and the words their error must contain."""
    data = ckpt.read_bytes()
    noise = bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())
    files = {
        "truncated": (data[: len(data) // 2], "is truncated"),
        "cut_at_end": (data[:-10], "is truncated"),
        "empty": (b"", "is empty (0 bytes)"),
        "random": (b"\x13" + noise, "is not a PyTorch checkpoint"),
        "random_pickle_byte": (b"\x80\x02" + noise, "is not a PyTorch checkpoint"),
        "bad_zip_member": (data[:30] + noise[:200] + data[230:], "is damaged (its data fails the archive's"),
        "text": (b"epoch=3 step=120\n", "is not a PyTorch checkpoint"),
    }
    out = {}
    for name, (content, words) in files.items():
        (folder / f"{name}.ckpt").write_bytes(content)
        out[name] = (folder / f"{name}.ckpt", words)
    return out


def test_export_of_a_corrupt_checkpoint_names_the_file_and_the_cause(run, tmp_path: Path, capsys) -> None:
    base, ckpt, _ = run
    for path, words in _corrupt_copies(ckpt, tmp_path).values():
        with pytest.raises(SystemExit) as exit_info:
            _export(path, base, tmp_path / "out", "peft")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and str(path) in err and words in err, err
        assert "--trust-checkpoint" not in err and "weights_only" not in err, err  # not the cause
    assert not (tmp_path / "out").exists()


def test_read_checkpoint_errors(run, tmp_path: Path) -> None:
    _, ckpt, _ = run
    for path, words in _corrupt_copies(ckpt, tmp_path).values():
        with pytest.raises(CheckpointFileError, match=re.escape(words)):
            read_checkpoint(path)
    with pytest.raises(CheckpointFileError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointFileError, match="holds a Tensor, not a checkpoint dict"):
        read_checkpoint(tmp_path / "tensor.pt")
    # A sound file with objects that safe loading refuses: that, and only that, points to the trust option.
    torch.save({"state_dict": {}, "extra": Fraction(1, 3)}, tmp_path / "objects.ckpt")
    with pytest.raises(
        CheckpointFileError,
        match="beyond tensors and plain data, which safe loading refuses; if you trust the file, add -x",
    ):
        read_checkpoint(tmp_path / "objects.ckpt", trust_hint="add -x")
    assert read_checkpoint(tmp_path / "objects.ckpt", weights_only=False)["extra"] == Fraction(1, 3)
    assert set(read_checkpoint(ckpt)) >= {"state_dict", "global_step"}
