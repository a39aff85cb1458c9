"""A run's strategy with the pieces its config adds around it, driven by the round loop.

The algorithm (:class:`~fedit.algorithms.strategies.base.Strategy`: FedAvg, FedAdam, SCAFFOLD, ...)
decides what the server does with the round's mean; around it a config may add, each
orthogonal to the algorithm:

- **robust aggregation** (``strategy.aggregator``: median, trimmed mean, (Multi-)Krum)
  instead of the example-weighted mean;
- **client-level differential privacy** (``[privacy]``, DP-FedAvg): updates clipped to
  norm C, Gaussian noise on their sum, (epsilon, delta) from an accountant each round;
- **mixed LoRA ranks** (``lora.client_ranks``) aggregated exactly on dW = (alpha/r) B A,
  and **FFA-LoRA** (``lora.freeze_a``: A frozen, only B sent);
- **compressed uploads** (``[compress]``: deltas, fp16/bf16, int8, top-k + error feedback);
- **the learning rate across rounds** (``train.round_schedule``): each round's peak lr in
  every instruction (:mod:`fedit.algorithms.schedule`).

Server side, per round::

    instr   = pipe.instruct(round, client, global, state)   # strategy.configure + pieces
    reply   = pipe.receive(reply, instr, global)             # decode the upload
    combined, info = pipe.combine(round, replies, instrs, global, state)
    global, state  = pipe.update(round, global, combined, state)

Client side :meth:`Pipeline.client_reply` turns the trained adapter into the upload. Every
piece keeps what it needs between rounds in the strategy's ``ServerState`` (scalars and
arrays under its own prefix) or the client's ``ClientState``, so ``--resume`` stays exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedit.algorithms.compress import Payload
from fedit.algorithms.contract import (
    Arrays,
    ClientState,
    Combined,
    Instruction,
    Reply,
    ServerState,
    TrainHook,
    TrainInfo,
)
from fedit.algorithms.hooks import CombinedHook, FreezeA
from fedit.algorithms.privacy import (
    adaptive_clip,
    clip_update,
    count_stddev_for,
    effective_noise_multiplier,
    epsilon_local,
    epsilon_spent,
    gaussian_noise,
    noisy_unclipped_fraction,
)
from fedit.algorithms.ranks import aggregate_ranks, client_adapter, lora_pairs
from fedit.algorithms.robust import robust_aggregate
from fedit.algorithms.schedule import ROUND_LR, round_lr
from fedit.algorithms.strategies.base import Strategy
from fedit.config import PrivacyConfig

DP_CLIP = "dp-clip"  # instruction key: the clip norm C this round (adaptive clipping moves it)
LORA_RANK = "lora-rank"  # instruction key: the LoRA rank this client trains
CODEC_PREFIX = "codec."  # reply extra arrays that belong to the upload's codec
RESIDUAL = "codec.residual"  # client state: top-k's error-feedback residual
UNIFORM = "secure-uniform"  # instruction key: weigh this upload 1 in SecAgg+'s sum (DP)


def _nbytes(arrays: Arrays) -> int:
    return int(sum(a.nbytes for a in arrays))


def start_of(instruction: Instruction, global_arrays: Arrays) -> Arrays:
    """The adapter a client starts from: its own rank's (``instruction.adapter``, sent in
    the global adapter's place), or the global one."""
    return instruction.adapter if instruction.adapter is not None else global_arrays


@dataclass
class PipelineOptions:
    """What a config adds around the algorithm (filled from the run config)."""

    aggregator: str = "mean"
    trim_fraction: float = 0.1
    krum_f: int = 1
    krum_m: int = 0
    privacy: PrivacyConfig | None = None  # [privacy], when its mode is not "off"
    codec: Any = None  # fedit.algorithms.compress.Codec; None: the trained weights as they are
    client_ranks: list[int] = field(default_factory=list)  # per client; [] = all lora.r
    rank_aggregation: str = "flexlora"
    freeze_a: bool = False
    lora_alpha: float = 16.0
    lora_r: int = 8
    adapter_names: list[str] = field(default_factory=list)  # wire order (ranks, FFA)
    num_clients: int = 0
    per_round: int = 0  # clients sampled a round (DP's fixed denominator)
    seed: int = 42
    secure: bool = False
    lr: float = 0.0  # train.lr: sent each round as ROUND_LR; 0 = not sent (the client's own)
    min_lr: float = 0.0
    round_schedule: str = "constant"
    rounds: int = 1


class Pipeline:
    """``strategy`` plus the options' pieces; the round loop and clients call only this."""

    def __init__(self, strategy: Strategy, options: PipelineOptions | None = None) -> None:
        self.strategy, self.o = strategy, options or PipelineOptions()
        o = self.o
        self.ranked = any(r != o.lora_r for r in o.client_ranks)  # some client's rank differs
        self._pairs: list[tuple[int, int]] = []
        if (self.ranked or o.freeze_a) and o.adapter_names:
            self._pairs = lora_pairs(o.adapter_names)

    @property
    def dp(self) -> PrivacyConfig:
        """``[privacy]``, where the caller knows privacy is on."""
        assert self.o.privacy is not None, "privacy is off"
        return self.o.privacy

    # -- description ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.strategy.name

    def describe(self) -> dict[str, Any]:
        """The strategy's name and parameters, and each piece that is on."""
        d = self.strategy.describe()
        o = self.o
        if o.aggregator != "mean":
            d["aggregator"] = o.aggregator
        if o.privacy is not None:
            d["privacy"] = {k: getattr(o.privacy, k) for k in
                            ("mode", "clip", "noise_multiplier", "delta", "adaptive")}
        if o.codec is not None:
            d["compress"] = o.codec.name
        if self.ranked:
            d["client_ranks"] = list(o.client_ranks)
            d["rank_aggregation"] = o.rank_aggregation
        if o.freeze_a:
            d["freeze_a"] = True
        return d

    # -- server ----------------------------------------------------------------------------
    def init_state(self, global_arrays: Arrays) -> ServerState:
        state = self.strategy.init_state(global_arrays)
        if self.o.privacy is not None:
            state.scalars.setdefault("dp.clip", float(self.o.privacy.clip))
            state.scalars.setdefault("dp.rounds", 0)
        return state

    def sample(self, server_round: int, clients: Sequence[int]) -> list[int]:
        return self.strategy.sample(server_round, clients)

    def client_rank(self, client: int) -> int:
        o = self.o
        return o.client_ranks[client] if self.ranked else o.lora_r

    def round_lr(self, server_round: int) -> float | None:
        """The round's peak learning rate (``train.round_schedule``); None: not set here."""
        o = self.o
        if not o.lr:
            return None
        return round_lr(o.round_schedule, o.lr, o.min_lr, server_round, o.rounds)

    def weight_bytes(self, instruction: Instruction, global_arrays: Arrays) -> tuple[int, int]:
        """One client's weight arrays of a round as FlowerTune counts them (their
        ``nbytes``): the adapter sent down (its start), and up as it would travel
        uncompressed (all of it; only the B factors under FFA-LoRA). A strategy's extra
        arrays and a codec's savings are in the runtime's ``bytes_up`` / ``bytes_down``."""
        start = self.start_of(instruction, global_arrays)
        return _nbytes(start), _nbytes(self._sent(start))

    def instruct(self, server_round: int, client: int, global_arrays: Arrays,
                 state: ServerState) -> Instruction:
        """The strategy's instruction, plus the round's lr, the clip norm, the rank and its
        start adapter."""
        instruction = self.strategy.configure(server_round, client, global_arrays, state)
        lr = self.round_lr(server_round)
        if lr is not None:
            instruction.config[ROUND_LR] = lr
        if self.o.privacy is not None:
            instruction.config[DP_CLIP] = float(state.scalars["dp.clip"])
            if self.o.secure:
                instruction.config[UNIFORM] = True
        if self.ranked:
            r = self.client_rank(client)
            instruction.config[LORA_RANK] = r
            if r != self.o.lora_r:
                instruction.adapter = client_adapter(
                    self.o.rank_aggregation, global_arrays, self.o.adapter_names,
                    self.o.lora_r, r, self.o.lora_alpha)
        return instruction

    def start_of(self, instruction: Instruction, global_arrays: Arrays) -> Arrays:
        """The adapter a client starts from (its rank's, or the global one)."""
        return start_of(instruction, global_arrays)

    def _sent(self, arrays: Arrays) -> Arrays:
        """What of an adapter travels: all of it, or only the B factors (FFA-LoRA)."""
        if not self.o.freeze_a:
            return list(arrays)
        return [arrays[b] for _, b in self._pairs]

    def receive(self, reply: Reply, instruction: Instruction, global_arrays: Arrays) -> Reply:
        """The reply with its upload decoded into a whole adapter shaped like its start.

        Raises ValueError (a one-line reason) for an upload that cannot be decoded."""
        start = self.start_of(instruction, global_arrays)
        extra = {k: v for k, v in reply.extra.items() if not k.startswith(CODEC_PREFIX)}
        arrays = reply.arrays
        if self.o.codec is not None:
            codec_extra = {k: v for k, v in reply.extra.items() if k.startswith(CODEC_PREFIX)}
            arrays = self.o.codec.decode(Payload(list(arrays), codec_extra), self._sent(start))
        if self.o.freeze_a:
            if len(arrays) != len(self._pairs):
                raise ValueError(f"{len(arrays)} B arrays, expected {len(self._pairs)}")
            full = list(start)
            for (_, b), array in zip(self._pairs, arrays, strict=True):
                full[b] = array
            arrays = full
        return replace(reply, arrays=list(arrays), extra=extra)

    def combine(self, server_round: int, replies: Sequence[Reply],
                instructions: dict[int, Instruction], global_arrays: Arrays,
                state: ServerState) -> tuple[Combined, dict[str, Any]]:
        """The round's aggregate (on the global adapter's shapes) and what to log of it."""
        o, info = self.o, dict[str, Any]()
        if o.privacy is not None:
            return self._private_combine(server_round, replies, instructions, global_arrays,
                                         state)
        if self.ranked:
            arrays = aggregate_ranks(
                o.rank_aggregation, [r.arrays for r in replies],
                [self.client_rank(r.client) for r in replies],
                [r.num_examples for r in replies], o.adapter_names, o.lora_alpha, o.lora_r)
            base = self.strategy.combine(server_round, [replace(r, arrays=[]) for r in replies])
            return replace(base, arrays=arrays), info
        if o.aggregator != "mean":
            arrays, info = robust_aggregate(
                o.aggregator, [r.arrays for r in replies], [r.num_examples for r in replies],
                trim_fraction=o.trim_fraction, krum_f=o.krum_f, krum_m=o.krum_m)
            if "selected" in info:  # positions in replies -> client ids
                info = {**info, "selected": [replies[i].client for i in info["selected"]]}
            base = self.strategy.combine(server_round, [replace(r, arrays=[]) for r in replies])
            return replace(base, arrays=arrays), info
        return self.strategy.combine(server_round, replies), info

    def _private_combine(self, server_round: int, replies: Sequence[Reply],
                         instructions: dict[int, Instruction], global_arrays: Arrays,
                         state: ServerState) -> tuple[Combined, dict[str, Any]]:
        """DP-FedAvg: each update clipped to C, their uniform sum plus N(0, (sigma C)^2)
        noise, divided by the expected number of clients a round (a fixed denominator, so
        one client moves the mean by at most C / m). Central mode clips and adds the noise
        here; local mode received updates already clipped and noised by each client."""
        p, o = self.dp, self.o
        clip = float(state.scalars["dp.clip"])
        total = [np.zeros(a.shape, np.float64) for a in global_arrays]
        unclipped = 0
        for r in replies:
            delta = [a.astype(np.float64) - g for a, g in zip(r.arrays, global_arrays,
                                                              strict=True)]
            if p.mode == "central":  # the server clips: clients need not be trusted to
                delta, norm = clip_update(delta, clip)
                unclipped += int(norm <= clip)
            total = [t + d for t, d in zip(total, delta, strict=True)]
        m = max(o.per_round, 1)
        if p.mode == "central":
            rng = np.random.default_rng([o.seed, server_round, 0xD9])
            noise = gaussian_noise(total, self._update_sigma() * clip, rng)
            total = [t + n for t, n in zip(total, noise, strict=True)]
        arrays = [(g + t / m).astype(g.dtype) for g, t in zip(global_arrays, total, strict=True)]
        base = self.strategy.combine(server_round, [replace(r, arrays=[]) for r in replies])
        return replace(base, arrays=arrays), {"dp_unclipped": unclipped}

    def secure_combined(self, server_round: int, combined: Combined, global_arrays: Arrays,
                        state: ServerState) -> Combined:
        """What SecAgg+ gave the server, with DP's noise added (central mode): clients
        clipped their updates and weighted them 1 each (``UNIFORM``), so the masked mean
        times its count is the sum of clipped updates, to which the noise is added here."""
        p = self.o.privacy
        if p is None:
            return combined
        m, n = max(self.o.per_round, 1), combined.num_replies
        total = [(a.astype(np.float64) - g) * n for a, g in zip(combined.arrays, global_arrays,
                                                                 strict=True)]
        if p.mode == "central":
            rng = np.random.default_rng([self.o.seed, server_round, 0xD9])
            clip = float(state.scalars["dp.clip"])
            noise = gaussian_noise(total, self._update_sigma() * clip, rng)
            total = [t + z for t, z in zip(total, noise, strict=True)]
        arrays = [(g + t / m).astype(g.dtype) for g, t in zip(global_arrays, total, strict=True)]
        return replace(combined, arrays=arrays)

    def secure_mean(self, server_round: int, replies: Sequence[Reply]) -> Combined:
        """The mean SecAgg+ computes (the in-process emulation): example-weighted, or
        uniform under DP."""
        if self.o.privacy is not None:
            replies = [replace(r, num_examples=1) for r in replies]
        return self.strategy.combine(server_round, replies)

    def update(self, server_round: int, global_arrays: Arrays, combined: Combined,
               state: ServerState, info: dict[str, Any] | None = None
               ) -> tuple[Arrays, ServerState]:
        """The strategy's server step, then the privacy bookkeeping (rounds, clip norm)."""
        new, new_state = self.strategy.server_update(server_round, global_arrays, combined,
                                                     state)
        p = self.o.privacy
        if p is not None:
            scalars = dict(new_state.scalars)
            scalars["dp.rounds"] = int(state.scalars.get("dp.rounds", 0)) + 1
            scalars["dp.clip"] = self._next_clip(server_round, state, combined, info or {})
            new_state = ServerState(arrays=new_state.arrays, scalars=scalars)
        return new, new_state

    def _next_clip(self, server_round: int, state: ServerState, combined: Combined,
                   info: dict[str, Any]) -> float:
        p, clip = self.dp, float(state.scalars["dp.clip"])
        if not p.adaptive or "dp_unclipped" not in info:
            return clip
        rng = np.random.default_rng([self.o.seed, server_round, 0xC1])
        m = max(self.o.per_round, 1)
        frac = noisy_unclipped_fraction(info["dp_unclipped"], m, self._count_stddev(), rng)
        return float(adaptive_clip(clip, frac, p.target_quantile, p.clip_lr))

    def _count_stddev(self) -> float:
        return float(count_stddev_for(self.dp, max(self.o.per_round, 1)))

    def _update_sigma(self) -> float:
        """The noise multiplier on the updates: all of sigma, or (adaptive clipping) what
        is left after the noisy unclipped count's share (Andrew et al., Thm. 1)."""
        p = self.dp
        if not p.adaptive:
            return float(p.noise_multiplier)
        return float(effective_noise_multiplier(p.noise_multiplier, self._count_stddev()))

    def round_metrics(self, state: ServerState) -> dict[str, Any]:
        """What the round's metrics line adds: (epsilon, delta) spent so far, the clip."""
        p = self.o.privacy
        if p is None:
            return {}
        rounds = int(state.scalars.get("dp.rounds", 0))
        sigma = p.noise_multiplier  # the whole budget: updates and count (adaptive) together
        if rounds == 0:
            eps = 0.0
        elif p.mode == "local":
            eps = epsilon_local(sigma, rounds, p.delta)
        else:
            q = min(1.0, max(self.o.per_round, 1) / max(self.o.num_clients, 1))
            eps = epsilon_spent(sigma, q, rounds, p.delta)
        return {"epsilon": eps, "delta": p.delta, "dp_clip": float(state.scalars["dp.clip"])}

    # -- client ----------------------------------------------------------------------------
    def train_hook(self, instruction: Instruction, state: ClientState) -> TrainHook | None:
        hooks = [h for h in (self.strategy.train_hook(instruction, state),) if h is not None]
        if self.o.freeze_a:
            hooks.append(FreezeA(self.o.adapter_names))
        if not hooks:
            return None
        return hooks[0] if len(hooks) == 1 else CombinedHook(hooks)

    def after_train(self, instruction: Instruction, state: ClientState, start: Arrays,
                    trained: Arrays, info: TrainInfo) -> dict[str, Arrays]:
        return self.strategy.after_train(instruction, state, start, trained, info)

    def client_upload(self, instruction: Instruction, state: ClientState, start: Arrays,
                      trained: Arrays, *, client: int, server_round: int
                      ) -> tuple[Arrays, dict[str, Arrays]]:
        """What the client sends: its adapter clipped / noised (DP at the client), only B
        (FFA), encoded (compression); plus the codec's arrays. Updates ``state`` (the
        error-feedback residual)."""
        p = self.o.privacy
        if p is not None and (p.mode == "local" or self.o.secure):
            trained = self._client_dp(instruction, start, trained, client, server_round)
        sent, sent_start = self._sent(trained), self._sent(start)
        codec = self.o.codec
        if codec is None:
            return sent, {}
        residual = state.arrays.get(RESIDUAL)
        payload, residual = codec.encode(sent_start, sent, residual)
        if residual is not None:
            state.arrays[RESIDUAL] = residual
        return payload.arrays, payload.extra

    def _client_dp(self, instruction: Instruction, start: Arrays, trained: Arrays,
                   client: int, server_round: int) -> Arrays:
        p = self.dp
        clip = float(instruction.config.get(DP_CLIP, p.clip))
        delta = [t.astype(np.float64) - s for t, s in zip(trained, start, strict=True)]
        clipped, _ = clip_update(delta, clip)
        if p.mode == "local":
            rng = np.random.default_rng([self.o.seed, server_round, client, 0x1D])
            noise = gaussian_noise(clipped, p.noise_multiplier * clip, rng)
            clipped = [c + n for c, n in zip(clipped, noise, strict=True)]
        return [(s + c).astype(t.dtype) for s, c, t in zip(start, clipped, trained, strict=True)]
