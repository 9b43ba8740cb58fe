"""Hybrid parallelism: a 2-D mesh of D data-parallel replicas x S pipeline stages.

Rank ``r`` is stage ``r % S`` of replica ``r // S``, so the S stages of one replica
are neighbouring ranks (their activation links stay local when ranks are packed
per machine). Each stage's gradients are summed across its D replicas with an
allreduce on a ``torch.distributed`` subgroup of the D ranks that hold that stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from paratrain.comm.accounting import ring_allreduce_bytes, tensor_nbytes
from paratrain.errors import ConfigError
from paratrain.parallel.base import GradientSync


@dataclass(frozen=True)
class Mesh:
    """Where one rank sits in a ``replicas x stages`` mesh."""

    stages: int
    replicas: int
    rank: int

    def __post_init__(self) -> None:
        for name in ("stages", "replicas"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be an integer >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank={self.rank} must be in [0, stages*replicas={self.world_size})")

    @property
    def world_size(self) -> int:
        return self.stages * self.replicas

    @property
    def stage(self) -> int:
        return self.rank % self.stages

    @property
    def replica(self) -> int:
        return self.rank // self.stages

    def rank_of(self, replica: int, stage: int) -> int:
        """Global rank of ``stage`` in ``replica``."""
        return replica * self.stages + stage

    def stage_ranks(self, stage: int) -> list[int]:
        """The D ranks holding ``stage``, one per replica (an allreduce group)."""
        return [self.rank_of(replica, stage) for replica in range(self.replicas)]

    @property
    def previous_rank(self) -> int | None:
        """Rank of the stage before this one in the same replica (None on stage 0)."""
        return self.rank - 1 if self.stage > 0 else None

    @property
    def next_rank(self) -> int | None:
        """Rank of the stage after this one in the same replica (None on the last)."""
        return self.rank + 1 if self.stage < self.stages - 1 else None


def build_mesh(stages: int, replicas: int, rank: int, world_size: int) -> Mesh:
    """A :class:`Mesh`, after checking that ``stages * replicas`` is the job's size."""
    if stages * replicas != world_size:
        raise ConfigError(
            f"stages={stages} x replicas={replicas} = {stages * replicas} processes, "
            f"but WORLD_SIZE={world_size}; launch exactly stages*replicas workers")
    return Mesh(stages=stages, replicas=replicas, rank=rank)


def new_stage_groups(mesh: Mesh):
    """One subgroup per stage across replicas; returns this rank's group (None when
    D == 1). Every rank must call it, since ``new_group`` is collective."""
    if mesh.replicas == 1:
        return None
    mine = None
    for stage in range(mesh.stages):  # same order on every rank, as new_group requires
        group = dist.new_group(mesh.stage_ranks(stage))
        if stage == mesh.stage:
            mine = group
    return mine


class StageReplicaSync(GradientSync):
    """Sums one stage's gradients over its D replicas (one flat allreduce per step)
    and scales them by 1 / global batch. With D == 1 it only scales."""

    def __init__(self, group=None, group_size: int = 1) -> None:
        super().__init__()
        self._group = group
        self._group_size = group_size
        self._params: list[torch.nn.Parameter] = []
        self._bytes_sent = 0

    def attach(self, params: Sequence[torch.nn.Parameter]) -> None:
        self._params = [p for p in params if p.requires_grad]
        if self._group is not None and self._params:
            # Replicas start equal even if their seeds differed: take replica 0's values.
            flat = torch.cat([p.detach().reshape(-1) for p in self._params])
            dist.broadcast(flat, src=dist.get_global_rank(self._group, 0), group=self._group)
            self._unflatten(flat, lambda p: p.data)

    def reduce(self, scale: float) -> None:
        for p in self._params:
            if p.grad is None:  # a layer unused this step still takes part in the sum
                p.grad = torch.zeros_like(p)
        if self._group is None or not self._params:
            for p in self._params:
                p.grad.mul_(scale)
            return
        flat = torch.cat([p.grad.reshape(-1) for p in self._params])
        dist.all_reduce(flat, group=self._group)
        self._bytes_sent += ring_allreduce_bytes(tensor_nbytes(flat), self._group_size)
        flat.mul_(scale)
        self._unflatten(flat, lambda p: p.grad)

    def _unflatten(self, flat: torch.Tensor, target) -> None:
        offset = 0
        for p in self._params:
            n = p.numel()
            target(p).copy_(flat[offset:offset + n].view_as(p))
            offset += n

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent


class TiedGradientSum:
    """Sums the gradients of a weight whose copies live on several stages (a traced
    pipeline's tied embedding and head): one allreduce per tied weight over the ranks
    of one replica that hold a copy, so every copy gets the gradient the unsplit
    model's single weight would get and the copies stay equal.

    ``groups``: per tied weight, ``{stage: that stage's name for its copy}``
    (:class:`paratrain.parallel.traced_split.TiedGroup.names`); ``module``: this rank's
    stage. Collective to build: every rank creates every subgroup, in the same order.
    """

    def __init__(self, mesh: Mesh, groups, module: torch.nn.Module) -> None:
        self._entries: list[tuple[torch.nn.Parameter, object, bool]] = []
        self._bytes_sent = 0
        for group in groups:
            names = getattr(group, "names", group)
            stages = sorted(names)
            if len(stages) < 2:
                continue
            for replica in range(mesh.replicas):
                process_group = dist.new_group([mesh.rank_of(replica, s) for s in stages])
                if replica == mesh.replica and mesh.stage in names:
                    param = module.get_parameter(names[mesh.stage])
                    self._entries.append((param, process_group, mesh.stage != stages[0]))

    def reduce(self) -> None:
        """Replace each copy's gradient by the sum over all copies."""
        for param, group, _ in self._entries:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=group)
            self._bytes_sent += ring_allreduce_bytes(tensor_nbytes(param.grad), dist.get_world_size(group))

    def duplicate_ids(self) -> set[int]:
        """``id`` of the copies that are not their weight's first: left out of a global
        gradient norm, so each tied weight counts once."""
        return {id(param) for param, _, duplicate in self._entries if duplicate}

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent
