"""A run's Pipeline from its config, and the checks that refuse, before anything runs,
the pieces that cannot work together (one line naming the keys)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedit.algorithms.aggregate import num_sampled
from fedit.algorithms.compress import make_codec
from fedit.algorithms.pipeline import Pipeline, PipelineOptions
from fedit.algorithms.strategies import strategy_from_config
from fedit.algorithms.strategies.base import Strategy
from fedit.config import PrivacyConfig
from fedit.errors import ConfigError


def pipeline_from_config(cfg: Any, adapter_names: Sequence[str] = (),
                         strategy: Strategy | None = None) -> Pipeline:
    """The run's pipeline: ``strategy`` (default ``strategy_from_config(cfg)``) and the
    pieces ``cfg`` turns on. ``adapter_names`` (the adapter's tensor names in wire order)
    are needed for mixed ranks and FFA-LoRA. The run set-up checks the config first
    (``check_compatible``)."""
    strategy = strategy if strategy is not None else strategy_from_config(cfg)
    if getattr(strategy.params, "num_clients", None) == 0:
        strategy.params.num_clients = cfg.partition.clients  # type: ignore[attr-defined]
    s, lora = cfg.strategy, cfg.lora
    options = PipelineOptions(
        aggregator=s.aggregator, trim_fraction=s.trim_fraction, krum_f=s.krum_f,
        krum_m=s.krum_m, privacy=_dp_params(cfg), codec=_codec(cfg),
        client_ranks=list(lora.client_ranks), rank_aggregation=lora.rank_aggregation,
        freeze_a=lora.freeze_a, lora_alpha=float(lora.alpha), lora_r=lora.r,
        adapter_names=list(adapter_names), num_clients=cfg.partition.clients,
        per_round=num_sampled(cfg.partition.clients, s.fraction, s.min_clients),
        seed=cfg.seed, secure=cfg.flower.secure_aggregation,
        lr=cfg.train.lr, min_lr=cfg.train.min_lr, round_schedule=cfg.train.round_schedule,
        rounds=cfg.rounds,
    )
    return Pipeline(strategy, options)


def _dp_params(cfg: Any) -> PrivacyConfig | None:
    return None if cfg.privacy.mode == "off" else cfg.privacy


def _codec(cfg: Any) -> Any:
    if cfg.compress.method == "none":
        return None
    c = cfg.compress
    return make_codec(c.method, topk_fraction=c.topk_fraction, error_feedback=c.error_feedback)


def _mixed_ranks(cfg: Any) -> bool:
    return any(r != cfg.lora.r for r in cfg.lora.client_ranks)


def incompatibilities(cfg: Any, strategy: Strategy) -> list[str]:
    """Why the config's pieces cannot run together (empty: they can), one line each."""
    s, p, secure = cfg.strategy, cfg.privacy, cfg.flower.secure_aggregation
    mixed, why = _mixed_ranks(cfg), []
    if secure:
        if not strategy.secure_aggregation:
            why.append(f"strategy.name = {strategy.name} needs each client's reply, which "
                       "SecAgg+ hides: set flower.secure_aggregation = false or another "
                       "strategy")
        if s.max_update_norm:
            why.append("strategy.max_update_norm cannot be checked under SecAgg+ (single "
                       "updates are masked): set it to 0 or flower.secure_aggregation = false")
        if s.aggregator != "mean":
            why.append(f"strategy.aggregator = {s.aggregator} ranks single updates, which "
                       "SecAgg+ hides: use mean or flower.secure_aggregation = false")
        if cfg.compress.method != "none":
            why.append(f"compress.method = {cfg.compress.method} under SecAgg+: "
                       f"{_codec(cfg).secure_reason}; use none")
        if mixed:
            why.append("lora.client_ranks (mixed ranks) needs each client's factors, which "
                       "SecAgg+ hides: drop client_ranks or flower.secure_aggregation = false")
        if p.mode != "off" and p.adaptive:
            why.append("privacy.adaptive needs each client's clipped/unclipped bit, which "
                       "SecAgg+ hides: set privacy.adaptive = false")
    if p.mode != "off":
        if s.aggregator != "mean":
            why.append(f"privacy.mode = {p.mode} calibrates its noise to the mean's "
                       f"sensitivity C/m: strategy.aggregator = {s.aggregator} is not the "
                       "mean; use mean")
        if strategy.name == "scaffold":
            why.append("scaffold's control-variate updates travel unclipped and without "
                       "noise, so they would leak what privacy hides: use another strategy "
                       "or privacy.mode = off")
        if mixed:
            why.append("privacy with lora.client_ranks: clipping is defined on one adapter "
                       "shape; drop client_ranks or set privacy.mode = off")
        if p.mode == "local" and p.adaptive:
            why.append("privacy.adaptive needs the server to see which updates were clipped; "
                       "in local mode it does not: set privacy.adaptive = false")
        per_round = num_sampled(cfg.partition.clients, s.fraction, s.min_clients)
        count_std = p.count_stddev or per_round / 20
        if p.adaptive and p.noise_multiplier and 2 * count_std <= p.noise_multiplier:
            why.append(f"privacy.adaptive: the unclipped count's noise ({count_std:g}, "
                       f"privacy.count_stddev or clients a round / 20) must exceed "
                       f"privacy.noise_multiplier / 2 = {p.noise_multiplier / 2:g}, or the "
                       "count alone spends the budget: raise privacy.count_stddev")
    if mixed and s.aggregator != "mean":
        why.append(f"strategy.aggregator = {s.aggregator} compares adapters of one shape; "
                   "with lora.client_ranks use mean")
    if mixed and cfg.personalize.method != "none":
        why.append(f"personalize.method = {cfg.personalize.method} keeps one adapter shape "
                   "per client: with lora.client_ranks set personalize.method = none")
    if mixed and strategy.name == "scaffold":
        why.append("scaffold's control variates are shaped like one adapter; with "
                   "lora.client_ranks use another strategy")
    return why


def check_compatible(cfg: Any, strategy: Strategy) -> None:
    """Raise ConfigError with the first reason the config cannot run (before round 1)."""
    why = incompatibilities(cfg, strategy)
    if why:
        raise ConfigError(why[0])
