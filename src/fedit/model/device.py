"""Where the model runs and in which dtype: the device, the CPU's bf16 support, dtype names."""

from __future__ import annotations

from pathlib import Path

import torch

from fedit.errors import ModelError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPES |= {str(v).removeprefix("torch."): v for v in _DTYPES.values()}  # "bfloat16", ...


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


def parse_dtype(dtype: torch.dtype | str, device: str = "cpu") -> torch.dtype:
    """Return the torch dtype a config value names.

    Parameters
    ----------
    dtype : torch.dtype or str
        A torch dtype (returned as is), ``"auto"`` (``pick_dtype(device)``), ``"bf16"``,
        ``"fp16"``, ``"fp32"`` or torch's own name (``"bfloat16"``, ...).
    device : str
        The device ``"auto"`` chooses for.

    Raises
    ------
    ModelError
        An unknown name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return pick_dtype(device)
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use auto, bf16 or fp32")
    return _DTYPES[dtype]
