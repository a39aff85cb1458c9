"""What ``fedit strategies`` prints: every algorithm and piece, its keys and defaults.

The keys and defaults are read from the dataclasses themselves (a strategy's parameters,
``[privacy]``, ``[compress]``, the ``[lora]`` rank keys), so the listing cannot drift from
what a config accepts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedit import config as c
from fedit.algorithms.strategies import STRATEGIES
from fedit.algorithms.strategies.base import StrategyParams

#: the paper of each piece (arXiv), shown beside it
PAPERS = {
    "fedavg": "1602.05629", "fedavgm": "1909.06335", "fedadagrad": "2003.00295",
    "fedadam": "2003.00295", "fedyogi": "2003.00295", "fedprox": "1812.06127",
    "scaffold": "1910.06378", "median": "1803.01498", "trimmed_mean": "1803.01498",
    "krum": "1703.02757", "multikrum": "1703.02757", "privacy": "1710.06963 + 1905.03871",
    "flexlora": "2402.11505 (+ FLoRA's stacking 2409.05976)", "hetlora": "2306.09914",
    "freeze_a": "2403.12313", "topk": "1809.07599",
}
_SHARED = {f.name for f in dataclasses.fields(StrategyParams)} | {"num_clients"}


def _own_keys(params_cls: type) -> list[tuple[str, Any]]:
    fields = dataclasses.fields(params_cls)
    return [(f.name, f.default) for f in fields if f.name not in _SHARED]


def _first_line(doc: str | None) -> str:
    line = (doc or "").strip().splitlines()[0].rstrip(".") if doc else ""
    return line.replace("``", "")


def _keys(prefix: str, pairs: list[tuple[str, Any]]) -> str:
    return ", ".join(f"{prefix}{k} = {v!r}" for k, v in pairs) or "-"


def catalog_lines() -> list[str]:
    """The listing, one line per algorithm or piece, grouped."""
    lines = ["algorithms (strategy.name; keys under [strategy]):"]
    for name, (cls, params) in STRATEGIES.items():
        sa = "" if cls.secure_aggregation else "  [not with SecAgg+]"
        lines.append(f"  {name:<12} {_first_line(cls.__doc__)} (arXiv {PAPERS.get(name, '-')})"
                     f"{sa}\n{'':15}{_keys('strategy.', _own_keys(params))}")
    lines.append("aggregation rules (strategy.aggregator; need single replies: not with "
                 "SecAgg+ or privacy):")
    lines.append(f"  {'mean':<12} the example-weighted mean (default)")
    for name, keys in (("median", []), ("trimmed_mean", [("trim_fraction", 0.1)]),
                       ("krum", [("krum_f", 1)]), ("multikrum", [("krum_f", 1),
                                                                  ("krum_m", 0)])):
        lines.append(f"  {name:<12} arXiv {PAPERS[name]}; {_keys('strategy.', keys)}")
    privacy = [(f.name, f.default) for f in dataclasses.fields(c.PrivacyConfig)]
    lines.append(f"client-level differential privacy [privacy] (arXiv {PAPERS['privacy']}):\n"
                 f"  {_keys('privacy.', privacy)}")
    compress = [(f.name, f.default) for f in dataclasses.fields(c.CompressConfig)]
    lines.append(f"compressed uploads [compress] (methods: {', '.join(c.COMPRESS_METHODS)}; "
                 f"only none with SecAgg+):\n  {_keys('compress.', compress)}")
    lines.append("LoRA ranks [lora]:")
    lines.append("  lora.client_ranks = [] (one rank per client, each <= lora.r)")
    for name in c.RANK_AGGREGATIONS:
        lines.append(f"  lora.rank_aggregation = {name!r}: arXiv {PAPERS[name]}")
    lines.append(f"  lora.freeze_a = False: FFA-LoRA, A frozen, only B sent (arXiv "
                 f"{PAPERS['freeze_a']})")
    return lines
