"""Pipeline parallelism as pure functions: where to cut a model, and in which order
each stage runs its micro-batches.

Nothing here touches the network. :mod:`paratrain.train.pipeline_strategy` runs the
action lists these functions produce, moving activations with
:mod:`paratrain.parallel.p2p`.

Partitions are given as layer *counts* per stage (``[3, 4]``: layers 0-2 on stage 0,
layers 3-6 on stage 1); :func:`resolve_partition` turns every way a user may ask for
one (equal counts, balanced parameters, balanced measured time, named split points)
into counts.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from paratrain.errors import ConfigError, check_choice

SCHEDULES = ("gpipe", "1f1b")
BALANCE_MODES = ("params", "time", "uniform")
FORWARD, BACKWARD = "forward", "backward"


# ---------------------------------------------------------------- partitioning


def check_stage_count(num_layers: int, num_stages: int) -> None:
    """Raise :class:`ConfigError` unless ``1 <= num_stages <= num_layers``."""
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ConfigError(f"stages={num_stages!r} must be an integer >= 1")
    if num_stages > num_layers:
        raise ConfigError(
            f"stages={num_stages} is more than the model's {num_layers} layers; "
            f"use at most {num_layers} stages")


def split_by_counts(counts: Sequence[int]) -> list[tuple[int, int]]:
    """Turn layer counts per stage into ``[start, end)`` layer bounds per stage."""
    bounds, start = [], 0
    for stage, count in enumerate(counts):
        if not isinstance(count, int) or count < 1:
            raise ConfigError(f"layer count {count!r} for stage {stage} must be an integer >= 1")
        bounds.append((start, start + count))
        start += count
    return bounds


def uniform_counts(num_layers: int, num_stages: int) -> list[int]:
    """Layer counts as equal as possible; earlier stages take the remainder."""
    check_stage_count(num_layers, num_stages)
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if stage < extra else 0) for stage in range(num_stages)]


def balance_by_cost(costs: Sequence[float], num_stages: int) -> list[int]:
    """Contiguous split of ``costs`` into ``num_stages`` non-empty parts that
    minimises the largest part's sum (the pipeline's slowest stage).

    Dynamic programming over (stage, first layer): O(stages * layers^2), which is
    nothing for the tens of layers a ``nn.Sequential`` has. Among equally good
    splits the one with the earliest cuts wins, so every rank computes the same.
    """
    num_layers = len(costs)
    check_stage_count(num_layers, num_stages)
    if any(c < 0 for c in costs):
        raise ConfigError(f"layer costs must be >= 0, got {list(costs)}")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: smallest max-part cost splitting layers i.. into k parts.
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][num_layers] = 0.0
    for k in range(1, num_stages + 1):
        for i in range(num_layers - k, -1, -1):
            for j in range(i + 1, num_layers - k + 2):
                value = max(prefix[j] - prefix[i], best[k - 1][j])
                if value < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = value, j
    counts, i = [], 0
    for k in range(num_stages, 0, -1):
        counts.append(cut[k][i] - i)
        i = cut[k][i]
    return counts


def counts_from_split_points(layer_names: Sequence[str], split_points: Sequence[str]) -> list[int]:
    """Counts for stages that begin at the named layers (``split_points`` names the
    first layer of stages 1..S-1, in model order)."""
    names = list(layer_names)
    positions = []
    for point in split_points:
        if point not in names:
            raise ConfigError(f"split point {point!r} is not a layer of the model; "
                              f"layers are: {', '.join(names)}")
        positions.append(names.index(point))
    if positions and positions[0] == 0:
        raise ConfigError(f"split point {split_points[0]!r} is the first layer; "
                          "name where stages 1.. begin, not stage 0")
    if positions != sorted(set(positions)):
        raise ConfigError(f"split points {list(split_points)} must be distinct and in model order")
    edges = [0, *positions, len(names)]
    return [edges[k + 1] - edges[k] for k in range(len(edges) - 1)]


def parameter_costs(model: nn.Sequential) -> list[int]:
    """Number of parameter elements in each layer."""
    return [sum(p.numel() for p in layer.parameters()) for layer in model]


def measure_layer_times(model: nn.Sequential, sample_input: torch.Tensor, *,
                        repeats: int = 5) -> list[float]:
    """Median seconds of forward + backward per layer on ``sample_input``.

    Runs on a deep copy, so the model's parameters and gradients stay untouched.
    """
    import copy
    import statistics
    layers = list(copy.deepcopy(model))
    times = [[] for _ in layers]
    for _ in range(repeats):
        x = sample_input.detach()
        for index, layer in enumerate(layers):
            x = x.detach().requires_grad_(x.is_floating_point())
            start = time.perf_counter()
            y = layer(x)
            if y.requires_grad:
                y.backward(torch.ones_like(y))
            times[index].append(time.perf_counter() - start)
            x = y
    return [statistics.median(t) for t in times]


def resolve_partition(model: nn.Sequential, num_stages: int, balance="params", *,
                      sample_input: torch.Tensor | None = None) -> list[int]:
    """Layer counts per stage for ``balance``, one of:

    * ``"uniform"``: equal layer counts;
    * ``"params"``: balanced parameter counts;
    * ``"time"``: balanced measured forward+backward time on ``sample_input``;
    * a list of ints: the layer counts themselves;
    * a list of layer names: where stages 1..S-1 begin.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"pipeline stages split an nn.Sequential, got {type(model).__name__}")
    num_layers = len(model)
    check_stage_count(num_layers, num_stages)
    if isinstance(balance, str):
        check_choice("balance", balance, BALANCE_MODES)
        if balance == "uniform":
            return uniform_counts(num_layers, num_stages)
        if balance == "params":
            return balance_by_cost(parameter_costs(model), num_stages)
        if sample_input is None:
            raise ConfigError("balance='time' needs a sample input to time the layers on")
        return balance_by_cost(measure_layer_times(model, sample_input), num_stages)
    items = list(balance)
    if len(items) != num_stages - (0 if all(isinstance(b, int) for b in items) else 1):
        raise ConfigError(
            f"balance={items!r} must list {num_stages} layer counts or "
            f"{num_stages - 1} split-point names for stages={num_stages}")
    if all(isinstance(b, int) for b in items):
        if sum(items) != num_layers:
            raise ConfigError(f"balance={items} sums to {sum(items)}, but the model has {num_layers} layers")
        split_by_counts(items)  # validates each count
        return items
    if all(isinstance(b, str) for b in items):
        return counts_from_split_points([name for name, _ in model.named_children()], items)
    raise ConfigError(f"balance={items!r} must be all layer counts (int) or all layer names (str)")


def build_stage_module(model: nn.Sequential, bounds: tuple[int, int]) -> nn.Sequential:
    """The layers ``[start, end)`` of ``model`` as their own ``nn.Sequential``.

    The layers keep their names, so a stage's ``state_dict`` keys are exactly the
    full model's keys and stage dicts merge into one the full model loads.
    """
    start, end = bounds
    named = list(model.named_children())[start:end]
    return nn.Sequential(OrderedDict(named))


# ------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Action:
    """One step of a stage's schedule: run ``kind`` for micro-batch ``micro_batch``."""

    kind: str
    micro_batch: int

    def __repr__(self) -> str:
        return f"{self.kind[0].upper()}{self.micro_batch}"


def _check_schedule_args(num_stages: int, num_micro_batches: int, stage: int) -> None:
    if num_stages < 1 or num_micro_batches < 1:
        raise ConfigError(f"stages={num_stages} and micro_batches={num_micro_batches} must be >= 1")
    if not 0 <= stage < num_stages:
        raise ConfigError(f"stage={stage} must be in [0, {num_stages})")


def gpipe_schedule(num_stages: int, num_micro_batches: int, stage: int) -> list[Action]:
    """GPipe: every forward, then every backward (activations of all M micro-batches
    are alive at once)."""
    _check_schedule_args(num_stages, num_micro_batches, stage)
    forwards = [Action(FORWARD, m) for m in range(num_micro_batches)]
    return forwards + [Action(BACKWARD, m) for m in range(num_micro_batches)]


def one_f_one_b_schedule(num_stages: int, num_micro_batches: int, stage: int) -> list[Action]:
    """1F1B (PipeDream-flush): ``S - stage - 1`` warm-up forwards, then alternate one
    forward and one backward, then drain the backwards. At most ``S - stage``
    micro-batches are in flight on a stage, whatever M is."""
    _check_schedule_args(num_stages, num_micro_batches, stage)
    warmup = min(num_stages - stage - 1, num_micro_batches)
    actions = [Action(FORWARD, m) for m in range(warmup)]
    next_backward = 0
    for m in range(warmup, num_micro_batches):
        actions += [Action(FORWARD, m), Action(BACKWARD, next_backward)]
        next_backward += 1
    actions += [Action(BACKWARD, m) for m in range(next_backward, num_micro_batches)]
    return actions


def build_schedule(name: str, num_stages: int, num_micro_batches: int, stage: int) -> list[Action]:
    """The action list of ``stage`` under schedule ``name`` (``gpipe`` or ``1f1b``)."""
    check_choice("schedule", name, SCHEDULES)
    build = gpipe_schedule if name == "gpipe" else one_f_one_b_schedule
    return build(num_stages, num_micro_batches, stage)


@dataclass(frozen=True)
class SimulatedRun:
    """Result of :func:`simulate_schedules`."""

    makespan: float
    idle_fraction: list[float]   # per stage: 1 - busy time / makespan
    peak_in_flight: list[int]    # per stage: most micro-batches forwarded, not yet backwarded


def simulate_schedules(schedules: Sequence[Sequence[Action]], *, forward_cost: float = 1.0,
                       backward_cost: float = 1.0) -> SimulatedRun:
    """Run per-stage action lists on an ideal machine (zero-cost messages, each
    stage its own processor) and report makespan, bubble and peak in-flight count.

    Raises ``ValueError`` when the lists deadlock (an action waits for one that
    can never run), so it doubles as a check of a schedule's validity.
    """
    num_stages = len(schedules)
    done: dict[tuple[str, int, int], float] = {}   # (kind, stage, micro) -> finish time
    clock, position = [0.0] * num_stages, [0] * num_stages
    in_flight, peak = [0] * num_stages, [0] * num_stages
    remaining = sum(len(s) for s in schedules)
    while remaining:
        progressed = False
        for stage, actions in enumerate(schedules):
            while position[stage] < len(actions):
                action = actions[position[stage]]
                if action.kind == FORWARD:
                    dep = (FORWARD, stage - 1, action.micro_batch) if stage > 0 else None
                    cost = forward_cost
                else:
                    dep = ((BACKWARD, stage + 1, action.micro_batch) if stage < num_stages - 1
                           else (FORWARD, stage, action.micro_batch))
                    cost = backward_cost
                if dep is not None and dep not in done:
                    break
                start = max(clock[stage], done[dep] if dep else 0.0)
                clock[stage] = start + cost
                done[(action.kind, stage, action.micro_batch)] = clock[stage]
                in_flight[stage] += 1 if action.kind == FORWARD else -1
                peak[stage] = max(peak[stage], in_flight[stage])
                position[stage] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {s: schedules[s][position[s]] for s in range(num_stages) if position[s] < len(schedules[s])}
            raise ValueError(f"schedules deadlock; stages wait at {stuck}")
    makespan = max(clock)
    busy = [sum(forward_cost if a.kind == FORWARD else backward_cost for a in s) for s in schedules]
    return SimulatedRun(makespan, [1.0 - b / makespan for b in busy], peak)


def theoretical_bubble(num_stages: int, num_micro_batches: int) -> float:
    """The idle fraction ``(S - 1) / (M + S - 1)`` of a balanced synchronous pipeline."""
    return (num_stages - 1) / (num_micro_batches + num_stages - 1)
