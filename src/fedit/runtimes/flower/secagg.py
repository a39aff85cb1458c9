"""SecAgg+ (``flower.secure_aggregation = true``) through Flower's own workflow and mod.

Flower 1.42 has SecAgg+ only in its legacy API: ``SecAggPlusWorkflow`` on the server
(driven here for one round at a time from fedit's own loop, with a tiny legacy strategy
that hands it the clients fedit's strategy sampled) and ``secaggplus_mod`` around a
legacy ``NumPyClient`` on the SuperNode, whose ``fit`` is ``client.train_on_node``.

Each client uploads ``[w, w * adapter]`` (w = its examples / ``max_weight``) quantised to
integers and masked; the server learns only the sum, hence the example-weighted mean:
the strategy's ``combine``, up to the quantisation error (see :func:`quantisation_bound`),
on which the round loop then runs the strategy's ``server_update`` in the clear (so
FedAvgM's momentum works under SecAgg+; a strategy that needs single replies is refused
before the run). The loop cannot check a single reply (shapes, finiteness, norm): it
checks the mean. The numbers of examples and the train losses still travel in clear.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedit.algorithms import payload as P
from fedit.algorithms.pipeline import UNIFORM
from fedit.algorithms.strategies import Combined, Instruction, Reply
from fedit.config import RunConfig
from fedit.federation.loop import RoundResult
from fedit.federation.replies import Dropped
from fedit.runtimes.flower import wire

EXAMPLES = "examples"  # reply metric: the examples trained (the SecAgg+ weight may be 1)

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid

SECAGG_RECORD = "secaggplus_configs"  # flwr.common.secure_aggregation.secaggplus_constants
NUM_SHARES = 1.0  # every sampled client holds a share of every other's secrets
RECONSTRUCTION_THRESHOLD = 0.5  # shares needed to unmask a client that dropped out
MODULUS_RANGE = 2**32  # masks are drawn in [0, 2**32): the sum must stay below


def is_secagg_message(message: Message) -> bool:
    """A message of one of the SecAgg+ stages (setup, share keys, collect, unmask)."""
    return SECAGG_RECORD in message.content.config_records


def quantisation_bound(weights: Iterable[float], max_weight: float, clipping_range: float,
                       quantization_range: int) -> float:
    """Largest difference between the SecAgg+ mean and the exact weighted mean.

    Each client rounds ``w * x`` (``w`` = its examples / ``max_weight``, ``|x| <= c``) to a
    grid of step ``2 c / Q`` and ``w`` to a grid of step ``1 / Q``: at most ``2 c / Q`` in
    all, per client; the sum is divided by the total weight.
    """
    weights = list(weights)
    total = sum(weights) / max_weight
    return len(weights) * 2 * clipping_range / quantization_range / total


# -- SuperNode side ------------------------------------------------------------------------
def legacy_client_app(train_on_node: Callable[..., Reply]) -> ClientApp:
    """The legacy ClientApp that ``secaggplus_mod`` wraps; its ``fit`` is
    ``train_on_node(arrays, config, node_config)`` (``fedit.runtimes.flower.client``'s)."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp

    class FeditClient(NumPyClient):  # type: ignore[misc]
        def __init__(self, node_config: dict[str, Any]) -> None:
            self.node_config = node_config

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
            reply = train_on_node([np.asarray(p, np.float32) for p in parameters], config,
                                  self.node_config)
            # under DP each upload weighs 1 (DP-FedAvg's uniform mean, C / m sensitivity)
            weight = 1 if config.get(UNIFORM) else reply.num_examples
            return reply.arrays, weight, {**reply.metrics, EXAMPLES: reply.num_examples}

    def client_fn(context: Context) -> Any:
        return FeditClient(dict(context.node_config)).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


# -- server side ---------------------------------------------------------------------------
class _MeteredGrid:
    """The Grid as SecAggPlusWorkflow uses it, with fedit's polling and a byte count."""

    def __init__(self, grid: Grid) -> None:
        self.grid, self.bytes_down, self.bytes_up = grid, 0, 0

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.bytes_down += sum(wire.content_bytes(m.content) for m in messages)
        replies = [r for r in wire.exchange(self.grid, messages, timeout or 3600) if r is not None]
        self.bytes_up += sum(wire.content_bytes(r.content) for r in replies if r.has_content())
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def _legacy_strategy(fitins: dict[int, tuple[Any, Any]]) -> Any:
    """A legacy Strategy that hands SecAggPlusWorkflow fedit's sampled clients and keeps
    what it aggregates."""
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import Strategy

    class Handover(Strategy):  # type: ignore[misc]
        def __init__(self) -> None:
            self.mean: list[np.ndarray] | None = None
            self.results: list[tuple[int, Any]] = []

        def initialize_parameters(self, client_manager: Any) -> None:
            return None

        def configure_fit(self, server_round: int, parameters: Any,
                          client_manager: Any) -> list[tuple[Any, Any]]:
            return list(fitins.values())

        def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]],
                          failures: Any) -> tuple[Any, dict[str, Any]]:
            if not results:
                return None, {}
            self.results = [(proxy.node_id, res) for proxy, res in results]
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
            return ndarrays_to_parameters(self.mean), {}

        def configure_evaluate(self, *args: Any) -> list[Any]:
            return []

        def aggregate_evaluate(self, *args: Any) -> tuple[None, dict[str, Any]]:
            return None, {}

        def evaluate(self, *args: Any) -> None:
            return None

    return Handover()


def secure_round(
    grid: Grid, nodes: dict[int, int], cfg: RunConfig, config_toml: str, server_round: int,
    global_arrays: list[np.ndarray], instructions: dict[int, Instruction],
) -> RoundResult:
    """One SecAgg+ round over ``nodes`` (client -> node id): the clients' replies without
    arrays (their numbers only), the masked weighted mean as ``combined``, what dropped."""
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow

    f, metered = cfg.flower, _MeteredGrid(grid)
    params = ndarrays_to_parameters(global_arrays)
    fitins = {
        nodes[c]: (
            GridClientProxy(nodes[c], metered, 0),  # type: ignore[arg-type]
            FitIns(params, {**instruction.config, P.SERVER_ROUND: server_round, P.CLIENT: c,
                            P.RUN_CONFIG: config_toml}),
        )
        for c, instruction in sorted(instructions.items())
    }
    strategy = _legacy_strategy(fitins)
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), strategy=strategy)
    context.state.config_records["config"] = ConfigRecord({"current_round": server_round})
    context.state.array_records["parameters"] = wire.arrays_to_record(global_arrays)
    workflow = SecAggPlusWorkflow(
        NUM_SHARES, RECONSTRUCTION_THRESHOLD, max_weight=f.secagg_max_weight,
        clipping_range=f.secagg_clipping_range, quantization_range=f.secagg_quantization_range,
        modulus_range=MODULUS_RANGE, timeout=f.round_timeout,
    )
    workflow(metered, context)  # type: ignore[arg-type]
    node_client = {n: c for c, n in nodes.items()}
    replies = sorted((Reply(node_client[nid], [], int(res.metrics.get(EXAMPLES,
                                                                      res.num_examples)),
                            {k: float(v) for k, v in res.metrics.items()})
                      for nid, res in strategy.results), key=lambda r: r.client)
    got = {r.client for r in replies}
    combined = None
    if strategy.mean is not None and replies:
        combined = Combined([np.asarray(m, dtype=np.float32) for m in strategy.mean],
                            num_examples=sum(r.num_examples for r in replies),
                            num_replies=len(replies))
    dropped = [Dropped(c, "dropped out of SecAgg+") for c in sorted(instructions)
               if c not in got]
    return RoundResult(replies, dropped, combined, bytes_up=metered.bytes_up,
                       bytes_down=metered.bytes_down)
