"""The base model and its LoRA adapter: load the tokenizer and the frozen base, attach LoRA.

The base (an alias, a local folder or a hub id: ``fedit.model.convert.resolve_model``) is loaded
once per process, frozen, and gets one LoRA adapter; only the adapter travels
(``fedit.model.adapter``). The device and dtype come from ``fedit.model.device``.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedit.errors import ConfigError, ModelError
from fedit.hub import hub_offline, hub_reachable
from fedit.model.adapter import adapter_params
from fedit.model.convert import ALIASES, resolve_model
from fedit.model.device import parse_dtype, pick_device


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
    """Load the tokenizer of a model name (see ``fedit.model.convert.resolve_model``).

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
        Alias, local folder or hub id (see ``fedit.model.convert.resolve_model``).
    dtype : torch.dtype or str
        Of the stored base weights: ``"auto"`` (``fedit.model.device.pick_dtype``), ``"bf16"``, ...
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
    torch_dtype = parse_dtype(dtype, device)
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

    The adapter goes on ``spec.target_modules``, or, when those are the default q/k/v/o
    projections and the architecture has none of them, on the attention projections PEFT
    names for the architecture (:func:`lora_targets`).
    The base model is modified in place (PEFT injects the adapter layers): attach once per
    process and move adapters in and out with ``fedit.model.adapter.set_adapter_arrays``. ``A``
    is drawn from ``seed`` without touching the global RNG; ``B`` is zero, so the adapter
    starts as a no-op. Adapter weights are fp32 whatever the base dtype, so their gradients
    and optimizer state are fp32 too. Returned in eval mode, like the base: call
    ``.train()`` to train (dropout on).

    Returns
    -------
    peft.PeftModel
    """
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(model, spec.target_modules)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(targets),
        fan_in_fan_out=_conv1d_targets(model, targets),  # GPT-2 stores weights as (in, out)
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
    for param in adapter_params(peft_model).values():
        param.data = param.data.float()
    return peft_model.eval()  # PEFT's new dropout layers start in train mode


#: ``LoraSpec``'s targets: Llama-style attention projections
DEFAULT_TARGETS = LoraSpec().target_modules


def linear_module_names(model: Any) -> list[str]:
    """Distinct names (last part) of the model's linear layers, ``lm_head`` aside, sorted.

    GPT-2's ``Conv1D`` counts as linear: LoRA can target it as well."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if name and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D")}
    return sorted(names - {"lm_head"})


def _matches(model: Any, targets: tuple[str, ...]) -> bool:
    """Whether a module name matches a target the way PEFT's list matching does."""
    return any(name == t or name.endswith("." + t)
               for name, _ in model.named_modules() for t in targets)


def _conv1d_targets(model: Any, targets: tuple[str, ...]) -> bool:
    """Whether the targeted layers are GPT-2 style ``Conv1D`` (weights stored transposed)."""
    return any(type(m).__name__ == "Conv1D" and any(n == t or n.endswith("." + t) for t in targets)
               for n, m in model.named_modules())


def lora_targets(model: Any, wanted: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The modules a LoRA adapter goes on: ``wanted`` when the model has them, else (for
    the default q/k/v/o only) PEFT's attention projections for the architecture.

    Raises
    ------
    ModelError
        When nothing matches, listing the model's linear layer names for
        ``lora.target_modules``.
    """
    wanted = tuple(wanted)
    if _matches(model, wanted):
        return wanted
    arch = model_type(model)
    if wanted == DEFAULT_TARGETS:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        known = tuple(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(arch, ()))
        if known and _matches(model, known):
            return known
    raise ModelError(
        f"cannot attach LoRA: lora.target_modules = {list(wanted)}: no layer of this {arch} "
        f"model has those names; set lora.target_modules to some of its linear layers: "
        f"{', '.join(linear_module_names(model))}")


def model_type(model: Any) -> str:
    """``config.model_type`` of a (PEFT-wrapped) transformers model, or ``"unknown"``."""
    return str(getattr(getattr(model, "config", None), "model_type", "") or "unknown")
