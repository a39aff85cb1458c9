"""The run configuration: typed dataclasses, read from TOML, overridden with ``--set a.b=c``.

Every key is checked on load: an unknown key is named with the closest valid one, a value
of the wrong type or out of range is named with what is allowed. ``to_toml`` writes the
fully resolved config into the run folder, so a run can be repeated from it alone.
"""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedit.config.toml import apply_overrides, build, toml_text
from fedit.errors import ConfigError

#: Dolly categories whose reference answers are short enough for exact match to mean
#: something (a label, a name, a number); the default of ``[eval] exact_match_categories``.
EXACT_MATCH_CATEGORIES = ("classification", "closed_qa")

log = logging.getLogger(__name__)
_NOTICED: set[str] = set()


def _notice(msg: str) -> None:
    """A one-line notice for an old spelling that still works: logged once per process
    (a config is built more than once while it loads)."""
    if msg not in _NOTICED:
        _NOTICED.add(msg)
        log.warning("fedit config: %s", msg)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class ModelConfig:
    name: str = field(default="smollm2-135m", metadata={"help": "alias, local folder or hub id"})
    dtype: str = field(default="auto", metadata={"help": "auto | bf16 | fp32 (base weights)"})
    quantization: int = field(default=0, metadata={"help": "0 = off, 4 = 4-bit base (CUDA)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})

    def __post_init__(self) -> None:
        _check(self.dtype in ("auto", "bf16", "fp32"), "model.dtype", "use auto, bf16 or fp32")
        _check(self.quantization in (0, 4), "model.quantization", "use 0 (off) or 4")
        _check(self.device in ("auto", "cpu", "cuda"), "model.device", "use auto, cpu or cuda")


RANK_AGGREGATIONS = ("flexlora", "hetlora")


@dataclass
class LoraConfig:
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "the projections that get an adapter"})
    client_ranks: list[int] = field(default_factory=list, metadata={
        "help": "one rank per client, each <= lora.r (the global adapter's rank); [] = all r"})
    rank_aggregation: str = field(default="flexlora", metadata={
        "help": "flexlora (exact mean of dW, SVD to each rank) | hetlora"})
    freeze_a: bool = field(default=False, metadata={
        "help": "FFA-LoRA: A stays at its seeded init, only B trains and travels"})
    init_from: str = field(default="", metadata={
        "help": "an adapter to start from: a run folder (its final adapter) or a PEFT "
                "adapter folder, of the run's r, alpha and target modules; DPO's "
                "reference then ('' = a fresh adapter, the base model)"})

    def __post_init__(self) -> None:
        _check(self.r > 0, "lora.r", "must be > 0")
        _check(all(0 < k <= self.r for k in self.client_ranks), "lora.client_ranks",
               f"each rank must be in 1..lora.r = {self.r} (the global adapter's rank)")
        _check(self.rank_aggregation in RANK_AGGREGATIONS, "lora.rank_aggregation",
               f"use one of {', '.join(RANK_AGGREGATIONS)}")
        _check(not (self.freeze_a and self.client_ranks and set(self.client_ranks) != {self.r}),
               "lora.freeze_a", "FFA-LoRA needs one rank for all clients: drop "
               "lora.client_ranks or set lora.freeze_a = false")
        _check(self.alpha > 0, "lora.alpha", "must be > 0")
        _check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        _check(len(self.target_modules) > 0, "lora.target_modules", "name at least one module")


INVALID_ROWS = ("error", "skip")  # data.invalid_rows (fedit.data.invalid)


#: the canonical names data.fields maps (instruction rows, conversations, preference pairs)
FIELD_NAMES = ("instruction", "context", "response", "messages", "prompt", "chosen", "rejected")


@dataclass
class DataConfig:
    path: str = field(default="dolly-15k", metadata={"help": "dolly-15k, a file, a folder"})
    fields: dict[str, str] = field(default_factory=dict)  # canonical name -> source column
    label_field: str = "category"  # per-label held-out rows, partitions, per-label metrics
    test_per_label: int = 10  # Shepherd holds out 10 rows per category
    clients_dir: str = ""  # a folder, one data file per client (README "Client folders")
    test_per_client: int = 0  # rows held out from each client's own rows (0 = none)
    max_rows: int = 0  # 0 = all rows; else a seeded random subset (taken before the split)
    template: str = "alpaca"  # alpaca (Shepherd's text) | chat (the model's chat template)
    # | chatml (built-in ChatML text); conversation rows use the chat template or chatml
    cutoff_len: int = 512
    train_on_inputs: bool = False  # False: loss on response tokens only
    truncation: str = "context"  # context (shorten it to fit, README "Data") | skip
    min_response_tokens: int = 16  # truncation = context: response tokens kept
    invalid_rows: str = "error"  # error (a bad row stops the load) | skip (drop and count it)
    max_invalid_fraction: float = 0.5  # skip: still stop when more of a file is invalid

    def __post_init__(self) -> None:
        _check(self.template in ("alpaca", "chat", "chatml"), "data.template",
               "use alpaca, chat or chatml")
        _check(self.cutoff_len >= 8, "data.cutoff_len", "must be >= 8")
        _check(self.truncation in ("context", "skip"), "data.truncation", "use context or skip")
        _check(self.min_response_tokens >= 1, "data.min_response_tokens", "must be >= 1")
        _check(self.invalid_rows in INVALID_ROWS, "data.invalid_rows", "use error or skip")
        _check(0 <= self.max_invalid_fraction <= 1, "data.max_invalid_fraction",
               "must be in [0, 1]")
        _check(self.test_per_label >= 0, "data.test_per_label", "must be >= 0")
        _check(self.test_per_client >= 0, "data.test_per_client", "must be >= 0")
        _check(self.max_rows >= 0, "data.max_rows", "must be >= 0 (0 = all rows)")
        bad = set(self.fields) - set(FIELD_NAMES)
        _check(not bad, "data.fields", f"unknown canonical field(s) {sorted(bad)}; "
               f"map one of {', '.join(FIELD_NAMES)}")


@dataclass
class PartitionConfig:
    method: str = "dirichlet"  # iid | shards | dirichlet | natural
    clients: int = 10
    alpha: float = 0.5  # Dirichlet concentration: smaller = more skewed clients
    min_size: int = 40  # Dirichlet: resample until every client has this many rows
    shards_per_client: int = 2
    by: str = ""  # field to partition on; default data.label_field

    def __post_init__(self) -> None:
        methods = ("iid", "shards", "dirichlet", "natural")
        _check(self.method in methods, "partition.method", f"use one of {', '.join(methods)}")
        _check(self.clients >= 1, "partition.clients", "must be >= 1")
        _check(self.alpha > 0, "partition.alpha", "must be > 0")
        _check(self.min_size >= 0, "partition.min_size", "must be >= 0")
        _check(self.shards_per_client >= 1, "partition.shards_per_client", "must be >= 1")


#: training objectives (fedit.client.objective; a test checks the two agree)
OBJECTIVE_NAMES = ("sft", "dpo")

#: each round's peak lr (fedit.algorithms.schedule; README "Learning rate across rounds")
ROUND_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    objective: str = "sft"  # sft: cross-entropy on the response tokens | dpo: preference pairs
    local_epochs: int = 1
    batch_size: int = 8  # examples per optimizer step
    micro_batch_size: int = 8  # examples per forward pass (gradient accumulation)
    lr: float = 3e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"  # linear (decay to 0 over the client's steps) | constant
    round_schedule: str = "constant"  # each round's peak lr: constant (lr) | cosine (to min_lr)
    min_lr: float = 0.0  # cosine: the last round's lr (FlowerTune's formula)
    max_grad_norm: float = 1.0  # 0 = no clipping
    max_steps: int = 0  # cap on optimizer steps per client round; 0 = epochs decide
    group_by_length: bool = True
    fused: bool = True  # fused LoRA / attention / loss kernels (see docs/performance.md)
    compile: bool = False  # torch.compile the decoder layers for training (see docs/performance.md)

    def __post_init__(self) -> None:
        _check(self.objective in OBJECTIVE_NAMES, "train.objective",
               f"use one of {', '.join(OBJECTIVE_NAMES)}")
        _check(self.local_epochs >= 1, "train.local_epochs", "must be >= 1")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(1 <= self.micro_batch_size <= self.batch_size, "train.micro_batch_size",
               "must be between 1 and train.batch_size")
        _check(self.batch_size % self.micro_batch_size == 0, "train.micro_batch_size",
               "must divide train.batch_size")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.lr_scheduler in ("linear", "constant"), "train.lr_scheduler",
               "use linear or constant")
        _check(self.round_schedule in ROUND_SCHEDULES, "train.round_schedule",
               f"use one of {', '.join(ROUND_SCHEDULES)}")
        _check(0 <= self.min_lr <= self.lr, "train.min_lr",
               f"must be in [0, train.lr = {self.lr:g}]")
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0 (0 = no cap)")
        _check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")


#: robust aggregation rules in fedit.algorithms.robust (a test checks the two agree)
AGGREGATOR_NAMES = ("mean", "median", "trimmed_mean", "krum", "multikrum")

#: strategies with a module in fedit.algorithms.strategies (a test checks the two agree)
STRATEGY_NAMES = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedprox", "scaffold")


def is_strategy_ref(name: str) -> bool:
    """Whether ``strategy.name`` names a user's class: ``module:Class``, ``file.py:Class``."""
    module, _, cls = name.rpartition(":")
    return bool(module) and cls.isidentifier()


@dataclass
class StrategyConfig:
    """The strategy and the round loop's rules, the same in both runtimes."""

    name: str = field(default="fedavg", metadata={
        "help": " | ".join(STRATEGY_NAMES) + ", or your own Strategy subclass: "
                "'my_module:MyStrategy' or 'path/to/file.py:MyStrategy'"})
    fraction: float = field(default=0.1, metadata={"help": "share of clients sampled each round"})
    min_clients: int = field(default=1, metadata={"help": "at least this many clients a round"})
    min_replies: int = field(default=1, metadata={
        "help": "valid replies a round needs to aggregate; fewer: global unchanged"})
    max_update_norm: float = field(default=0.0, metadata={
        "help": "drop a reply farther (L2) from the global; 0 = no bound"})
    aggregator: str = field(default="mean", metadata={"help": " | ".join(AGGREGATOR_NAMES)})
    trim_fraction: float = field(default=0.1, metadata={
        "help": "trimmed_mean: share cut from each end, per coordinate"})
    krum_f: int = field(default=1, metadata={
        "help": "krum, multikrum: Byzantine clients tolerated (needs > 2f + 2 replies)"})
    krum_m: int = field(default=0, metadata={
        "help": "multikrum: updates averaged; 0 = replies - krum_f"})
    server_lr: float | None = field(default=None, metadata={
        "help": "fedavgm, fedadagrad, fedadam, fedyogi, scaffold: the server's step; not set "
                "= the strategy's own default (fedavgm 1.0, fedadagrad/fedadam/fedyogi 1e-2, "
                "scaffold 1.0)"})
    server_momentum: float = field(default=0.9, metadata={
        "help": "fedavgm: the momentum's decay (0 = FedAvg)"})
    beta1: float = field(default=0.9, metadata={
        "help": "fedadagrad, fedadam, fedyogi: the first moment's decay"})
    beta2: float = field(default=0.99, metadata={
        "help": "fedadam, fedyogi: the second moment's decay"})
    tau: float = field(default=1e-3, metadata={
        "help": "fedadagrad, fedadam, fedyogi: adaptivity floor (v starts at tau^2)"})
    mu: float = field(default=0.01, metadata={
        "help": "fedprox: the proximal term's weight (0 = FedAvg)"})
    params: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "[strategy.params]: the parameters of the strategy's own dataclass (a "
                "strategy of yours: its params_class); unknown keys are refused when the "
                "strategy is built"})

    def __post_init__(self) -> None:
        _check(self.name in STRATEGY_NAMES or is_strategy_ref(self.name), "strategy.name",
               f"use one of {', '.join(STRATEGY_NAMES)}, or your own Strategy subclass as "
               "'module:Class' or 'path/to/file.py:Class'")
        _check(0 < self.fraction <= 1, "strategy.fraction", "must be in (0, 1]")
        _check(self.min_clients >= 1, "strategy.min_clients", "must be >= 1")
        _check(self.min_replies >= 1, "strategy.min_replies", "must be >= 1")
        _check(self.max_update_norm >= 0, "strategy.max_update_norm", "must be >= 0 (0 = off)")
        _check(self.aggregator in AGGREGATOR_NAMES, "strategy.aggregator",
               f"use one of {', '.join(AGGREGATOR_NAMES)}")
        _check(0 <= self.trim_fraction < 0.5, "strategy.trim_fraction", "must be in [0, 0.5)")
        _check(self.krum_f >= 0, "strategy.krum_f", "must be >= 0")
        _check(self.krum_m >= 0, "strategy.krum_m", "must be >= 0 (0 = replies - krum_f)")
        if self.server_lr == 0:  # the old spelling of "not set"; 0 is no step at all
            _notice("strategy.server_lr = 0 is read as not set (the strategy's own default); "
                    "leave the key out instead")
            self.server_lr = None
        _check(self.server_lr is None or self.server_lr > 0, "strategy.server_lr",
               "must be > 0 (leave it out for the strategy's own default)")
        _check(0 <= self.server_momentum < 1, "strategy.server_momentum", "must be in [0, 1)")
        _check(0 <= self.beta1 < 1, "strategy.beta1", "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "strategy.beta2", "must be in [0, 1)")
        _check(self.tau > 0, "strategy.tau", "must be > 0")
        _check(self.mu >= 0, "strategy.mu", "must be >= 0 (0 = FedAvg)")


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (DP-FedAvg); see docs/strategies.md."""

    mode: str = field(default="off", metadata={
        "help": "off | central (server clips, adds noise) | local (each client does)"})
    clip: float = field(default=1.0, metadata={
        "help": "C: each client's update (L2 over the adapter) is clipped to this"})
    noise_multiplier: float = field(default=1.0, metadata={
        "help": "sigma: noise std is sigma * C on the sum of updates"})
    delta: float = field(default=1e-5, metadata={
        "help": "the delta of the (epsilon, delta) reported"})
    adaptive: bool = field(default=False, metadata={
        "help": "move C towards a quantile of the update norms (Andrew et al.)"})
    target_quantile: float = field(default=0.5, metadata={
        "help": "adaptive: share of updates C should leave unclipped"})
    clip_lr: float = field(default=0.2, metadata={
        "help": "adaptive: geometric step of C each round"})
    count_stddev: float = field(default=0.0, metadata={
        "help": "adaptive: noise on the unclipped count; 0 = clients/round / 20"})

    def __post_init__(self) -> None:
        _check(self.mode in ("off", "central", "local"), "privacy.mode",
               "use off, central or local")
        _check(self.clip > 0, "privacy.clip", "must be > 0")
        _check(self.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
        _check(0 < self.delta < 1, "privacy.delta", "must be in (0, 1)")
        _check(0 < self.target_quantile < 1, "privacy.target_quantile", "must be in (0, 1)")
        _check(self.clip_lr > 0, "privacy.clip_lr", "must be > 0")
        _check(self.count_stddev >= 0, "privacy.count_stddev", "must be >= 0 (0 = default)")


COMPRESS_METHODS = ("none", "delta", "fp16", "bf16", "int8", "topk")


@dataclass
class CompressConfig:
    """How a client's update travels up (see docs/strategies.md for the measured bytes)."""

    method: str = field(default="none", metadata={"help": " | ".join(COMPRESS_METHODS)})
    topk_fraction: float = field(default=0.01, metadata={
        "help": "topk: share of each tensor's entries sent"})
    error_feedback: bool = field(default=True, metadata={
        "help": "topk: what was not sent is added to the next round's update"})

    def __post_init__(self) -> None:
        _check(self.method in COMPRESS_METHODS, "compress.method",
               f"use one of {', '.join(COMPRESS_METHODS)}")
        _check(0 < self.topk_fraction <= 1, "compress.topk_fraction", "must be in (0, 1]")


DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig:
    """Direct preference optimisation (``train.objective = "dpo"``; Rafailov et al. 2023,
    arXiv 2305.18290; IPO: Azar et al. 2023, arXiv 2310.12036)."""

    beta: float = field(default=0.1, metadata={
        "help": "strength of the pull towards the reference (smaller: further from it)"})
    loss: str = field(default="sigmoid", metadata={"help": " | ".join(DPO_LOSSES)})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "sigmoid: assumed share of flipped labels (conservative DPO)"})

    def __post_init__(self) -> None:
        _check(self.beta > 0, "dpo.beta", "must be > 0")
        _check(self.loss in DPO_LOSSES, "dpo.loss", f"use one of {', '.join(DPO_LOSSES)}")
        _check(0 <= self.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
        _check(self.label_smoothing == 0 or self.loss == "sigmoid", "dpo.label_smoothing",
               "applies to loss = \"sigmoid\" only; set it to 0 for ipo")


@dataclass
class CheckpointConfig:
    """What each committed round keeps on disk (see docs/architecture.md)."""

    keep_last: int = 0  # keep the newest N round checkpoints (>= 2: one to fall back to); 0 = all

    def __post_init__(self) -> None:
        _check(self.keep_last == 0 or self.keep_last >= 2, "checkpoint.keep_last",
               "must be 0 (keep all) or >= 2 (a corrupt newest one falls back to the one before)")


@dataclass
class EvalConfig:
    every: int = 1  # evaluate the global adapter every N rounds (and always after the last)
    batch_size: int = 16  # no-grad batch size for held-out loss
    # `fedit eval`: generation and the metrics on the answers
    max_new_tokens: int = 128  # answer length cap
    generate_batch_size: int = 16  # answers decoded together (continuous batching, KV cache)
    generate_batch_tokens: int = 8192  # and at most this many positions (padding included)
    do_sample: bool = False  # False: greedy decoding (temperature and top_p unused)
    temperature: float = 1.0
    top_p: float = 1.0
    # categories with short answers; exact match is None for the others
    exact_match_categories: list[str] = field(default_factory=lambda: list(EXACT_MATCH_CATEGORIES))
    similarity: bool = True  # embedding cosine (all-MiniLM-L6-v2) of answer and reference

    def __post_init__(self) -> None:
        _check(self.every >= 0, "eval.every", "must be >= 0 (0 = only after the last round)")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _check(self.generate_batch_size >= 1, "eval.generate_batch_size", "must be >= 1")
        _check(self.generate_batch_tokens >= 1, "eval.generate_batch_tokens", "must be >= 1")
        _check(self.temperature > 0, "eval.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]")


@dataclass
class FlowerConfig:
    """Only read by the Flower runtime (``fedit flower``, ``flwr run``); ignored in-process."""

    round_timeout: float = 600.0  # seconds the server waits for a round's replies
    node_timeout: float = 120.0  # seconds to wait at the start for partition.clients nodes
    secure_aggregation: bool = False  # SecAgg+: the server only sees the weighted sum
    secagg_clipping_range: float = 8.0  # SecAgg+: values clipped to +-this before quantising
    secagg_quantization_range: int = 4194304  # SecAgg+: 2**22 levels over the clipping range
    secagg_max_weight: float = 1000.0  # SecAgg+: above any client's examples (precision)

    def __post_init__(self) -> None:
        _check(self.round_timeout > 0, "flower.round_timeout", "must be > 0 (seconds)")
        _check(self.node_timeout >= 0, "flower.node_timeout", "must be >= 0 (seconds)")
        _check(self.secagg_clipping_range > 0, "flower.secagg_clipping_range", "must be > 0")
        _check(0 < self.secagg_quantization_range < 2**32, "flower.secagg_quantization_range",
               "must be in (0, 2**32)")
        _check(self.secagg_max_weight > 0, "flower.secagg_max_weight", "must be > 0")


PERSONALIZE_METHODS = ("none", "finetune", "ditto")


@dataclass
class PersonalizeConfig:
    """Personal adapters, one per client (see README "Personalisation")."""

    method: str = "none"  # none | finetune (after the last round) | ditto (Li et al. 2021)
    lam: float = 0.1  # ditto: lambda of the term lam/2 ||v_k - w_global||^2 (0 = local only)
    lr: float = 0.0  # the personal adapter's learning rate; 0 = train.lr
    epochs: int = 1  # finetune: epochs over the client's rows after the last round
    max_steps: int = 0  # finetune: cap on its optimizer steps; 0 = epochs decide

    def __post_init__(self) -> None:
        _check(self.method in PERSONALIZE_METHODS, "personalize.method",
               f"use one of {', '.join(PERSONALIZE_METHODS)}")
        _check(self.lam >= 0, "personalize.lam", "must be >= 0")
        _check(self.lr >= 0, "personalize.lr", "must be >= 0 (0 = train.lr)")
        _check(self.epochs >= 1, "personalize.epochs", "must be >= 1")
        _check(self.max_steps >= 0, "personalize.max_steps", "must be >= 0 (0 = no cap)")


WANDB_MODES = ("", "online", "offline", "disabled")


@dataclass
class LogConfig:
    """Where a run's curves go besides metrics.jsonl (README "Watch training in
    TensorBoard or W&B"); the packages are checked when the run is set up."""

    tensorboard: bool | None = field(default=None, metadata={
        "help": "events under <run>/tensorboard; not set = on when the tensorboard "
                "package is installed"})
    wandb: str = field(default="", metadata={
        "help": "a Weights & Biases project to log each round to ('' = off)"})
    wandb_mode: str = field(default="", metadata={
        "help": "online | offline | disabled; '' = W&B's own (WANDB_MODE, else online)"})

    def __post_init__(self) -> None:
        _check(self.wandb_mode in WANDB_MODES, "log.wandb_mode",
               "use online, offline or disabled (or leave it out: WANDB_MODE decides)")


@dataclass
class RunConfig:
    name: str = ""  # run folder name; default: <config file stem>-<timestamp>
    output_dir: str = "runs"
    seed: int = 42
    rounds: int = 3
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    personalize: PersonalizeConfig = field(default_factory=PersonalizeConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "rounds", "must be >= 1")
        # a client folder (data.clients_dir) sets partition.clients when the run is set up
        # (fedit.data.clients.with_client_count): building a config reads no disk
        if not self.data.clients_dir:
            self.check_client_ranks()

    def check_client_ranks(self) -> None:
        """``lora.client_ranks`` gives one rank per client (or none)."""
        ranks = self.lora.client_ranks
        _check(not ranks or len(ranks) == self.partition.clients, "lora.client_ranks",
               f"give one rank per client: {len(ranks)} ranks for partition.clients = "
               f"{self.partition.clients}")


# Reading and writing (the machinery is in fedit.config.toml)


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a checked :class:`RunConfig` from nested dicts (as parsed from TOML)."""
    return build(RunConfig, raw)  # type: ignore[no-any-return]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML config (or start from defaults when ``path`` is None) and apply overrides.

    The file is checked alone first, so an error names the file or ``--set``, whichever
    brought the bad key."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
            config_from_dict(raw)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    try:
        return config_from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"--set: {e}") from None


def to_toml(cfg: RunConfig) -> str:
    """The fully resolved config as TOML text (round-trips through :func:`load_config`)."""
    return "# fedit run config, fully resolved\n" + toml_text(dataclasses.asdict(cfg))
