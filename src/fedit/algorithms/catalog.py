"""What ``fedit strategies`` prints: every algorithm and piece, its keys and defaults.

The keys, defaults and help are read from the dataclasses themselves (a strategy's
parameters; ``[strategy]``, ``[privacy]``, ``[compress]`` and ``[lora]`` from
:mod:`fedit.config`, each field's ``metadata["help"]``), so the listing cannot drift from
what a config accepts (a test checks every default printed against its field).
"""

from __future__ import annotations

import dataclasses
import textwrap
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
#: the ``[strategy]`` keys each robust rule reads (defaults and help: StrategyConfig's)
RULE_KEYS: dict[str, tuple[str, ...]] = {
    "median": (), "trimmed_mean": ("trim_fraction",), "krum": ("krum_f",),
    "multikrum": ("krum_f", "krum_m"),
}
#: ``[strategy]`` keys of the round loop itself (sampling, reply checks)
ROUND_KEYS = ("fraction", "min_clients", "min_replies", "max_update_norm")
_SHARED = {f.name for f in dataclasses.fields(StrategyParams)} | {"num_clients"}
_WIDTH = 110  # help is wrapped to this many columns


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _own_keys(params_cls: type) -> list[tuple[str, Any]]:
    return [(n, _default(f)) for n, f in _fields(params_cls).items() if n not in _SHARED]


def _first_line(doc: str | None) -> str:
    line = (doc or "").strip().splitlines()[0].rstrip(".") if doc else ""
    return line.replace("``", "")


def _keys(prefix: str, pairs: list[tuple[str, Any]]) -> str:
    return ", ".join(f"{prefix}{k} = {v!r}" for k, v in pairs) or "-"


def _help_lines(prefix: str, cls: type, names: list[str] | tuple[str, ...],
                defaults: bool = True, indent: int = 2,
                notes: dict[str, str] | None = None) -> list[str]:
    """One entry per key: ``prefix.key = default`` (or the bare key) and its help (plus
    ``notes[key]``), the help in one column, wrapped."""
    fields, notes = _fields(cls), notes or {}
    heads = [f"{prefix}{n}" + (f" = {_default(fields[n])!r}" if defaults else "")
             for n in names]
    col = indent + max((len(h) for h in heads), default=0) + 2
    lines = []
    for name, head in zip(names, heads, strict=True):
        text = fields[name].metadata.get("help", "") + notes.get(name, "")
        lines.append(textwrap.fill(text, _WIDTH, subsequent_indent=" " * col,
                                   initial_indent=" " * indent + head.ljust(col - indent))
                     if text else " " * indent + head)
    return lines


def catalog_lines() -> list[str]:
    """The listing, one line per algorithm or piece, grouped."""
    lines = ["algorithms (strategy.name; keys under [strategy], with each algorithm's own "
             "defaults):"]
    algorithm_keys: list[str] = []
    for name, (cls, params) in STRATEGIES.items():
        sa = "" if cls.secure_aggregation else "  [not with SecAgg+]"
        own = _own_keys(params)
        lines.append(f"  {name:<12} {_first_line(cls.__doc__)} (arXiv {PAPERS.get(name, '-')})"
                     f"{sa}")
        if own:
            lines.append(f"{'':15}{_keys('strategy.', own)}")
        algorithm_keys += [k for k, _ in own if k not in algorithm_keys]
    lines.append("  their keys:")
    lines += _help_lines("strategy.", c.StrategyConfig, algorithm_keys, defaults=False,
                         indent=4)
    lines.append("aggregation rules (strategy.aggregator; need single replies: not with "
                 "SecAgg+ or privacy):")
    lines.append(f"  {'mean':<12} the example-weighted mean (default)")
    strategy = _fields(c.StrategyConfig)
    for name, keys in RULE_KEYS.items():
        pairs = [(k, _default(strategy[k])) for k in keys]
        lines.append(f"  {name:<12} arXiv {PAPERS[name]}" + (f"; {_keys('strategy.', pairs)}"
                                                             if pairs else ""))
    lines.append("  their keys:")
    rule_keys = list(dict.fromkeys(k for keys in RULE_KEYS.values() for k in keys))
    lines += _help_lines("strategy.", c.StrategyConfig, rule_keys, indent=4)
    lines.append("sampling and reply checks [strategy] (every algorithm):")
    lines += _help_lines("strategy.", c.StrategyConfig, ROUND_KEYS)
    lines.append(f"client-level differential privacy [privacy] (arXiv {PAPERS['privacy']}):")
    lines += _help_lines("privacy.", c.PrivacyConfig, list(_fields(c.PrivacyConfig)))
    lines.append("compressed uploads [compress] (only none with SecAgg+):")
    lines += _help_lines("compress.", c.CompressConfig, list(_fields(c.CompressConfig)),
                         notes={"method": f" (topk: arXiv {PAPERS['topk']})"})
    lines.append("LoRA ranks [lora]:")
    lora = _help_lines("lora.", c.LoraConfig, ["client_ranks", "rank_aggregation", "freeze_a"],
                       notes={"freeze_a": f" (arXiv {PAPERS['freeze_a']})"})
    papers = [f"{'':6}{name}: arXiv {PAPERS[name]}" for name in c.RANK_AGGREGATIONS]
    return lines + lora[:2] + papers + lora[2:]
