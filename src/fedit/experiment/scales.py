"""The experiment's scale presets and its step budget.

Scales (``SCALES``, each overridable with ``--set``; ``fedit experiment --scale``):

``test``
    A few steps for the test suite; pass a tiny model with ``--set model.name=DIR``.
``small``
    SmolLM2-135M on this 2-core CPU in ~71-98 minutes. 20 clients (Dirichlet 0.5,
    >= 40 rows each), 4 rounds x 4 clients (fraction 0.2) x 10 steps of batch 8 at
    cutoff 256, lr 5e-4 (the pilot's settings, ``notes/paper-pilot.md``):

    - fedit 4 x 4 x 10 = 160 steps, centralized 160, local-only 2 clients x 40 = 80:
      400 optimizer steps at ~8-12 s = 53-80 min;
    - held-out loss on the 48 rows (6 per category; 42 fit cutoff 256): measured 39 s of
      CPU on one thread (fp32, this AMD EPYC has no bf16 path), ~23 s on two; 5 passes
      in the FedIT run (rounds 0-4) + 6 arm evaluations = 11 passes, ~4 min;
    - generation for ROUGE-L / similarity: 6 evaluations (base, 2 local clients, fedit,
      centralized; the local-only mean reuses its clients'). Prompts are not cut to the
      cutoff: this split's run 35-1,883 tokens, so length-sorted batches of 8 prefill
      ~21.7k padded tokens (batches of 16: 34k). Measured for the 48 rows, <= 64 new
      tokens: 242 s of CPU on one thread (2,516 new tokens), ~140 s on two: ~14 min.

    Total ~71-98 min (~88 at 10 s a step), inside the 2-hour limit. On a 2-core Intel
    Xeon's bf16 path (AMX) a seed took ~26 min (2026-12-03, ``docs/results.md``). To
    shorten it, lower ``eval.max_new_tokens`` (decoding is ~45% of generation) or
    ``rounds``.
``medium``
    SmolLM2-135M on this 2-core CPU's bf16 path (AVX-512-BF16) in ~79-90 minutes, sized so
    that the generation metrics can separate the arms (``docs/results.md``: at ``small``
    ROUGE-L and similarity on 48 rows of <= 64 tokens were within noise). Run on
    2026-12-03 in 73.8 min (``docs/results.md``; a 2-core Intel Xeon with AMX).
    As ``small`` (20 clients, fraction 0.2, 10 steps of batch 8 at cutoff 256, lr 5e-4)
    but 10 rounds, 3 local-only clients, 20 held-out rows a category (160) and answers of
    <= 128 new tokens, generated in length-sorted batches of 16. The numbers used are the
    bf16 figures of ``docs/performance.md`` ("AMD EPYC with AVX-512-BF16, 2026-12-02"):
    training 618 tokens/s (fused kernels, responses only), held-out loss 1,463 tokens/s,
    generation 70.9 new tokens/s in batches of 16, round overhead x1.04:

    - fedit 10 x 4 x 10 = 400 steps, centralized 400, local-only 3 clients x 100 = 300:
      1,100 optimizer steps. A batch of 8 x ~146 tokens (the profiled step) at 618
      tokens/s is ~1.9 s; the profiled 4.4 s unfused step / 1.75 (the kernels' gain) is
      ~2.5 s: 35-46 min (+4% FedIT round overhead, ~1 min);
    - generation: 6 evaluations (base, 3 local clients, fedit, centralized), each at most
      160 x 128 = 20,480 new tokens at 70.9/s = 4.8 min, plus prefill of the uncut
      prompts (``small``'s 34k padded tokens for 48 rows in batches of 16, x 160/48 =
      ~113k) at ~1,463 tokens/s = ~1.3 min: <= 6.1 min each, ~37 min (``small``'s
      answers filled 82% of their tokens, so likely less);
    - held-out loss on 160 rows x ~150 tokens (assumed; cut at 256): ~16 s a pass; 11
      passes in the FedIT run (rounds 0-10) + 6 arm evaluations = 17 passes, ~5 min;
      model and data load ~1 min.

    Total ~79-90 min. If it runs long, lower ``eval.max_new_tokens`` or ``rounds``.
    Measured (2026-12-03, 2-core Intel Xeon with AMX, bf16): 73.8 min in all; training
    2.1 s a step for the local-only clients (10.7 min for 300 steps), 2.8 s for the
    centralized arm's longer rows (18.5 min for 400), FedIT 21.1 min for 400 steps with
    its 11 held-out loss passes; each arm's evaluation (loss + 160 answers, 7.0-12.4k
    new tokens, well under the 20.5k cap) 2.4-4.7 min.
``full``
    The reference setting for a GPU: FederatedGPT-Shepherd's published example
    (README of github.com/JayZhang42/FederatedGPT-Shepherd: 10 clients, 10 rounds,
    ``client_selection_frac 0.1``, batch 64 / micro-batch 32, lr 3e-4, LoRA r=8 on
    q/k/v/o, cutoff 512, 10 held-out rows per category) with the issue's Dirichlet(0.5)
    split. Shepherd trains 2 local epochs a round; here 50 steps a round (about 2 epochs
    of a 1,500-row client at batch 64) so that every arm's budget is exact. That example
    tunes ``chavinlo/alpaca-native`` (a LLaMA-7B); the model stays SmolLM2 here, pass
    ``--set model.name=...`` for a larger one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedit.algorithms.strategies import num_sampled
from fedit.config import RunConfig, config_from_dict
from fedit.config.toml import apply_overrides
from fedit.data.clients import with_client_count
from fedit.errors import ConfigError

EXPERIMENTS = ("fedit-paper", "fedit-dpo")

SCALES: dict[str, dict[str, Any]] = {
    "test": {
        "rounds": 2,
        "data": {"path": "dolly-15k", "max_rows": 400, "test_per_label": 1, "cutoff_len": 256},
        "partition": {"method": "dirichlet", "clients": 4, "alpha": 0.5, "min_size": 4},
        "train": {"batch_size": 4, "micro_batch_size": 4, "max_steps": 1, "lr": 5e-4},
        "strategy": {"fraction": 0.5},
        "eval": {"every": 1, "batch_size": 16, "max_new_tokens": 8, "similarity": False},
        "experiment": {"local_clients": 2},
    },
    "small": {
        "rounds": 4,
        "model": {"name": "smollm2-135m"},
        "data": {"path": "dolly-15k", "test_per_label": 6, "cutoff_len": 256,
                 "train_on_inputs": False},
        "partition": {"method": "dirichlet", "clients": 20, "alpha": 0.5, "min_size": 40},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 10, "lr": 5e-4},
        "strategy": {"fraction": 0.2},
        "eval": {"every": 1, "batch_size": 16, "max_new_tokens": 64,
                 "generate_batch_size": 8},
        "experiment": {"local_clients": 2},
    },
    "medium": {  # the arithmetic and the measured time are in the module docstring
        "rounds": 10,
        "model": {"name": "smollm2-135m"},
        "data": {"path": "dolly-15k", "test_per_label": 20, "cutoff_len": 256,
                 "train_on_inputs": False},
        "partition": {"method": "dirichlet", "clients": 20, "alpha": 0.5, "min_size": 40},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 10, "lr": 5e-4},
        "strategy": {"fraction": 0.2},
        "eval": {"every": 1, "batch_size": 16, "max_new_tokens": 128,
                 "generate_batch_size": 16},
        "experiment": {"local_clients": 3},
    },
    "full": {
        "rounds": 10,
        "model": {"name": "smollm2-135m"},
        "data": {"path": "dolly-15k", "test_per_label": 10, "cutoff_len": 512,
                 "train_on_inputs": True},
        "partition": {"method": "dirichlet", "clients": 10, "alpha": 0.5, "min_size": 40},
        "train": {"batch_size": 64, "micro_batch_size": 32, "max_steps": 50, "lr": 3e-4},
        "strategy": {"fraction": 0.1},
        "eval": {"every": 1, "batch_size": 16, "max_new_tokens": 256},
        "experiment": {"local_clients": 3},
    },
}


#: fedit-dpo's scales: federated DPO on self-play pairs (:mod:`fedit.model.self_play`)
DPO_SCALES: dict[str, dict[str, Any]] = {
    "test": {
        "rounds": 2,
        "data": {"path": "dolly-15k", "template": "chatml", "test_per_label": 1,
                 "cutoff_len": 192, "min_response_tokens": 4},
        "partition": {"method": "iid", "clients": 4},
        "train": {"objective": "dpo", "batch_size": 2, "micro_batch_size": 2,
                  "max_steps": 1, "lr": 5e-4},
        "strategy": {"fraction": 0.5},
        "eval": {"every": 1, "batch_size": 8, "max_new_tokens": 4, "similarity": False},
        "experiment": {"local_clients": 2, "pairs_per_label": 3, "pairs_max_new_tokens": 40},
    },
    "small": {  # 27 min measured on 2 fp32 AMD cores, pairs cached (docs/results.md, 4):
        # 4 x 2 x 6 steps (fedit), 48 (centralized), 2 x 24 (local-only) of 4 packed pairs
        # at ~2.7-4.5 s; each arm's evaluation ~2.1 min (80 pairs, answers <= 96 tokens)
        "rounds": 4,
        "model": {"name": "smollm2-135m"},
        "data": {"path": "dolly-15k", "template": "chatml", "test_per_label": 10,
                 "cutoff_len": 256, "min_response_tokens": 16},
        "partition": {"method": "dirichlet", "clients": 8, "alpha": 0.5, "min_size": 10},
        "train": {"objective": "dpo", "batch_size": 4, "micro_batch_size": 4,
                  "max_steps": 6, "lr": 2e-4},
        "dpo": {"beta": 0.1, "loss": "sigmoid"},
        "strategy": {"fraction": 0.25},
        "eval": {"every": 1, "batch_size": 16, "max_new_tokens": 96,
                 "generate_batch_size": 48},
        "experiment": {"local_clients": 2, "pairs_per_label": 40, "pairs_max_new_tokens": 96},
    },
}


def scales_of(name: str) -> dict[str, dict[str, Any]]:
    """The scale presets of an experiment."""
    return DPO_SCALES if name == "fedit-dpo" else SCALES


@dataclass
class ExperimentSettings:
    """What the experiment adds to a run config (``--set experiment.KEY=VALUE``)."""

    local_clients: int = 2  # clients trained alone in the local-only arm
    generate: bool = True  # answers for ROUGE-L / similarity (False: loss only, faster)
    # fedit-dpo only: a preference file to use, else self-play pairs built from data.path
    pairs: str = ""
    pairs_per_label: int = 40  # self-play pairs drawn per label
    pairs_max_new_tokens: int = 96  # the model's rejected answers stop here

    def __post_init__(self) -> None:
        for name in ("local_clients", "pairs_per_label", "pairs_max_new_tokens"):
            value = getattr(self, name)
            if type(value) is not int:
                raise ConfigError(f"experiment.{name}: expected int, got {value!r}")
            if value < 1:
                raise ConfigError(f"experiment.{name}: must be >= 1")
        if type(self.generate) is not bool:
            raise ConfigError(f"experiment.generate: expected true or false, got "
                              f"{self.generate!r}")
        if type(self.pairs) is not str:
            raise ConfigError(f"experiment.pairs: expected a file path, got {self.pairs!r}")

    def recorded(self, experiment: str) -> dict[str, Any]:
        """The settings an experiment uses (config.toml's ``[experiment]``)."""
        out = dataclasses.asdict(self)
        if experiment != "fedit-dpo":
            for key in ("pairs", "pairs_per_label", "pairs_max_new_tokens"):
                out.pop(key)
        return out


@dataclass(frozen=True)
class Budget:
    """Optimizer steps of each arm, fixed before anything trains."""

    rounds: int
    clients_per_round: int
    local_steps: int  # one client, one round

    @property
    def client_steps(self) -> int:
        """Steps of one client over the whole FedIT run (= a local-only client's)."""
        return self.rounds * self.local_steps

    @property
    def total_steps(self) -> int:
        """Steps of the whole FedIT run (= the centralized arm's)."""
        return self.rounds * self.clients_per_round * self.local_steps

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "client_steps": self.client_steps,
                "total_steps": self.total_steps}


def experiment_config(
    name: str, scale: str, overrides: list[str] | None = None
) -> tuple[RunConfig, ExperimentSettings]:
    """The checked run config and experiment settings of a scale preset plus ``--set``s."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; use one of {', '.join(EXPERIMENTS)}")
    scales = scales_of(name)
    if scale not in scales:
        mine = "" if scales is SCALES else f" ({name}'s scales)"
        raise ConfigError(f"--scale {scale!r}: use one of {', '.join(scales)}{mine}")
    try:
        raw = apply_overrides(scales[scale], overrides or [])
        extra = raw.pop("experiment", {})
        known = {f.name for f in dataclasses.fields(ExperimentSettings)}
        for key in extra:
            if key not in known:
                raise ConfigError(f"unknown key 'experiment.{key}'; use one of "
                                  f"{', '.join('experiment.' + k for k in sorted(known))}")
        settings = ExperimentSettings(**extra)
        raw.setdefault("name", f"{name}-{scale}")
        cfg = with_client_count(config_from_dict(raw))  # a client folder sets the count
    except ConfigError as e:
        raise ConfigError(f"--set: {e}") from None
    if cfg.train.max_steps < 1:
        raise ConfigError("--set: train.max_steps: the experiment needs a step budget per "
                          "client round (>= 1); 0 would let data sizes decide")
    return cfg, settings


def plan_budget(cfg: RunConfig) -> Budget:
    """The per-arm step budget of a config (clients a round as the strategy samples them)."""
    s = cfg.strategy
    per_round = num_sampled(cfg.partition.clients, s.fraction, s.min_clients)
    return Budget(cfg.rounds, per_round, cfg.train.max_steps)


def local_only_clients(cfg: RunConfig, k: int) -> list[int]:
    """The ``k`` clients of the local-only arm: a seeded draw, sorted."""
    n = cfg.partition.clients
    if k > n:
        raise ConfigError(f"experiment.local_clients = {k} but partition.clients = {n}")
    rng = np.random.default_rng([cfg.seed, 7])
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


__all__ = ["DPO_SCALES", "EXPERIMENTS", "SCALES", "Budget", "ExperimentSettings",
           "experiment_config", "local_only_clients", "plan_budget", "scales_of"]
