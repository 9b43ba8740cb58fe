"""Compressed bucket reducers (the protocol is :mod:`paratrain.parallel.reducers`).

``wait`` returns a fresh tensor holding the SUM over workers, which the caller may
scale in place; the caller's bucket is never changed. Every launch starts its first
collective with ``async_op=True`` so buckets overlap backward; a second phase (gather
of fp16 chunk sums, PowerSGD's ``Q``) runs inside ``wait``.

| codec | collectives | what ``wait`` returns |
|---|---|---|
| none | (the plain :class:`~paratrain.parallel.reducers.AllreduceReducer`) | the exact sum, in place |
| fp16, bf16 | all_to_all of cast chunks, fp32 sum per chunk, all_gather | ``N * cast(sum_fp32(cast(x_r / N)))`` (fp16: pre-scaled by 1/N) |
| 2bit, 1bit, topk, quant | all_gather of payloads | the sum, in rank order, of each worker's decoded gradient |
| powersgd | all_reduce of ``P``, then of ``Q`` | ``P Q_sum^T``: the sum of each worker's ``P Q_r^T`` |

``payload_bytes`` is 4 bytes per entry plain, 2 for fp16/bf16, 1/4 for 2bit, 1/8 for 1bit, 8 * ratio
for topk, about bits/8 for quant, ``P`` and ``Q`` for PowerSGD; ``bytes_sent`` follows
:mod:`paratrain.comm.accounting`, as the plain path does, so the numbers in one
Speedometer line compare. Gathering costs N-1 copies, so on 4 workers 2bit saves 16x
in payload but about 8x on the wire.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from paratrain.comm import codecs
from paratrain.comm.accounting import all_gather_bytes, all_to_all_bytes, tensor_nbytes
from paratrain.comm.codecs import CompressionConfig
from paratrain.comm.process_group import wait_work
from paratrain.errors import ConfigError
from paratrain.parallel.reducers import AllreduceReducer, BucketReducer, PendingReduce


# --------------------------------------------------------------------------- plumbing

def sum_in_rank_order(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``tensors[0] + tensors[1] + ...`` in fp32, in that order, so every rank (and a
    reference simulation) gets the same bits."""
    total = tensors[0].float().clone()
    for tensor in tensors[1:]:
        total += tensor.float()
    return total


# --------------------------------------------------------------------------- fp16, bf16

class CastReducer(BucketReducer):
    """fp16/bf16 on the wire, summed in fp32: a reduce-scatter made of ``all_to_all``
    (each worker receives every worker's cast copy of one chunk and sums it in fp32),
    then an ``all_gather`` of the cast chunk sums. fp16 payloads are pre-scaled by
    1/N so that neither a payload nor the chunk sum can overflow where the fp32
    gradient itself fits in fp16."""

    def __init__(self, dtype: torch.dtype, group=None) -> None:
        super().__init__(group)
        self.dtype = dtype

    def launch(self, bucket_index: int, flat: torch.Tensor) -> PendingReduce:
        workers, numel = self.num_workers, flat.numel()
        scale = 1.0 / workers if self.dtype == torch.float16 else 1.0
        chunk = math.ceil(numel / workers)
        send = torch.zeros(chunk * workers, dtype=self.dtype, device=flat.device)
        send[:numel] = codecs.encode_cast(flat.detach(), self.dtype, scale=scale)
        received = torch.empty_like(send)
        if workers == 1:
            received.copy_(send)
            work = None
        else:
            work = dist.all_to_all_single(received, send, group=self.group, async_op=True)
        self.payload_bytes += numel * send.element_size()
        self.bytes_sent += all_to_all_bytes(tensor_nbytes(send), workers)

        def finish(timeout: float) -> torch.Tensor:
            deadline = time.monotonic() + timeout
            wait_work(work, timeout, f"all_to_all of {self.dtype} bucket {bucket_index}")
            chunk_sum = sum_in_rank_order(received.view(workers, chunk)).to(self.dtype)
            self.bytes_sent += all_gather_bytes(tensor_nbytes(chunk_sum), workers)
            gathered = torch.empty(chunk * workers, dtype=self.dtype, device=flat.device)
            wait_work(self._all_gather(gathered, chunk_sum), deadline - time.monotonic(),
                      f"all_gather of {self.dtype} chunk sums of bucket {bucket_index}")
            return codecs.decode_cast(gathered[:numel], scale=scale).to(flat.dtype)
        return PendingReduce(finish)


# --------------------------------------------------------------------------- 2bit, topk

#: Codecs whose payloads are gathered, decoded and summed (no collective sums them).
GATHERED_CODECS = ("2bit", "1bit", "topk", "quant")


class GatherReducer(BucketReducer):
    """2bit, 1bit, topk and quant payloads cannot be summed by a collective: every
    worker gathers all payloads and sums the decoded gradients in rank order. The
    residual (error feedback) of each bucket stays on this worker."""

    def __init__(self, config: CompressionConfig, group=None) -> None:
        if config.type not in GATHERED_CODECS:
            raise ConfigError(f"GatherReducer handles compression types {', '.join(GATHERED_CODECS)}, "
                              f"not {config.type!r}")
        super().__init__(group)
        self.config = config
        self.residuals: dict[int, torch.Tensor] = {}

    def encode(self, bucket_index: int, flat: torch.Tensor) -> torch.Tensor:
        """This worker's int32 payload for the bucket; updates its residual."""
        residual = self.residuals.get(bucket_index)
        if residual is not None and residual.numel() != flat.numel():
            residual = None
        payload, state = codecs.encode(self.config, flat, codecs.CodecState(residual=residual))
        self.residuals[bucket_index] = state.residual
        return payload[0]

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return codecs.decode(self.config, [payload], numel)

    def launch(self, bucket_index: int, flat: torch.Tensor) -> PendingReduce:
        payload = self.encode(bucket_index, flat)
        workers, numel = self.num_workers, flat.numel()
        gathered = torch.empty(workers * payload.numel(), dtype=payload.dtype, device=payload.device)
        work = self._all_gather(gathered, payload)
        nbytes = tensor_nbytes(payload)
        self.payload_bytes += nbytes
        self.bytes_sent += all_gather_bytes(nbytes, workers)

        def finish(timeout: float) -> torch.Tensor:
            wait_work(work, timeout, f"all_gather of {self.config.type} bucket {bucket_index}")
            decoded = [self.decode(row, numel) for row in gathered.view(workers, -1)]
            return sum_in_rank_order(decoded).to(flat.dtype)
        return PendingReduce(finish)


# --------------------------------------------------------------------------- powersgd

@dataclass(frozen=True)
class Segment:
    """A slice of a bucket: compressed as a ``rows x cols`` matrix, or sent as is."""

    start: int
    numel: int
    rows: int = 0
    cols: int = 0

    @property
    def compressed(self) -> bool:
        return self.rows > 0


def plan_segments(shapes: Sequence[Sequence[int]] | None, numel: int, rank: int) -> list[Segment]:
    """How PowerSGD cuts a bucket (a pure function). With known parameter shapes, each
    tensor of 2+ dims is a ``shape[0] x rest`` matrix; vectors (biases) and matrices
    that rank ``rank`` would not shrink are sent uncompressed. Without shapes the
    whole bucket is one near-square matrix."""
    if shapes is None:
        rows, cols = codecs.matrix_shape(numel)
        pieces = [(0, numel, rows, cols)]
    else:
        pieces, start = [], 0
        for shape in shapes:
            size = math.prod(shape)
            rows = shape[0] if len(shape) >= 2 else 0
            pieces.append((start, size, rows, size // rows if rows else 0))
            start += size
        if start != numel:
            raise ConfigError(f"bucket shapes {list(map(tuple, shapes))} hold {start} entries, the bucket {numel}")
    segments = []
    for start, size, rows, cols in pieces:
        r = min(rank, rows, cols)
        worth_it = rows > 0 and r * (rows + cols) < size
        segments.append(Segment(start, size, rows, cols) if worth_it else Segment(start, size))
    return segments


@dataclass
class _PowerSGDBucket:
    segments: list[Segment]
    residual: torch.Tensor
    qs: dict[int, torch.Tensor] = field(default_factory=dict)   # segment index -> warm Q


class PowerSGDReducer(BucketReducer):
    """PowerSGD (Vogels et al. 2019) with error feedback and a warm-started ``Q``.

    ``M_r = grad_r + residual_r``; all_reduce ``P = sum_r M_r Q`` (async, overlaps
    backward); orthonormalise ``P``; all_reduce ``Q_sum = sum_r M_r^T P``; the result is
    ``P Q_sum^T``; ``residual_r = M_r - P (M_r^T P)^T``; ``Q_sum`` warm-starts the next
    step. Uncompressed segments ride along in the ``P`` all_reduce.
    """

    def __init__(self, config: CompressionConfig, group=None) -> None:
        if config.type != "powersgd":
            raise ConfigError(f"PowerSGDReducer handles compression type powersgd, not {config.type!r}")
        super().__init__(group)
        self.config = config
        self.shapes: dict[int, list[tuple[int, ...]]] = {}
        self.buckets: dict[int, _PowerSGDBucket] = {}

    def describe_bucket(self, bucket_index: int, shapes: Sequence[torch.Size]) -> None:
        self.shapes[bucket_index] = [tuple(shape) for shape in shapes]
        self.buckets.pop(bucket_index, None)

    def _bucket(self, bucket_index: int, numel: int, device: torch.device) -> _PowerSGDBucket:
        state = self.buckets.get(bucket_index)
        if state is None or state.residual.numel() != numel:
            segments = plan_segments(self.shapes.get(bucket_index), numel, self.config.rank)
            state = _PowerSGDBucket(segments, torch.zeros(numel, device=device))
            self.buckets[bucket_index] = state
        return state

    def _warm_q(self, state: _PowerSGDBucket, bucket_index: int, index: int, segment: Segment) -> torch.Tensor:
        q = state.qs.get(index)
        if q is None or not torch.isfinite(q).all() or not q.abs().max() > 0:
            # A zero (or non-finite) gradient leaves a useless Q: start again from the seed.
            rank = min(self.config.rank, segment.rows, segment.cols)
            q = codecs.initial_q(segment.cols, rank, self.config.seed + 7919 * bucket_index + index).to(
                state.residual.device)
        return q

    def launch(self, bucket_index: int, flat: torch.Tensor) -> PendingReduce:
        state = self._bucket(bucket_index, flat.numel(), flat.device)
        m_flat = flat.detach().reshape(-1).float() + state.residual
        matrices, p_parts = {}, []
        for index, segment in enumerate(state.segments):
            piece = m_flat[segment.start:segment.start + segment.numel]
            if segment.compressed:
                matrix = torch.zeros(segment.rows * segment.cols, device=flat.device)
                matrix[:segment.numel] = piece
                matrices[index] = matrix.view(segment.rows, segment.cols)
                p_parts.append(codecs.powersgd_p(matrices[index], self._warm_q(state, bucket_index, index, segment)).reshape(-1))
            else:
                p_parts.append(piece)
        p_buffer = torch.cat(p_parts)
        work = self._all_reduce(p_buffer)
        self._count_all_reduce(p_buffer)

        def finish(timeout: float) -> torch.Tensor:
            deadline = time.monotonic() + timeout
            wait_work(work, timeout, f"all_reduce of PowerSGD P of bucket {bucket_index}")
            return self._finish(bucket_index, state, matrices, p_buffer, deadline).to(flat.dtype)
        return PendingReduce(finish)

    def _finish(self, bucket_index: int, state: _PowerSGDBucket, matrices: dict,
                p_buffer: torch.Tensor, deadline: float) -> torch.Tensor:
        result = torch.zeros(state.residual.numel(), device=state.residual.device)
        new_residual = torch.zeros_like(result)
        ps, q_locals, offset = {}, {}, 0
        for index, segment in enumerate(state.segments):
            if segment.compressed:
                rank = min(self.config.rank, segment.rows, segment.cols)
                size = segment.rows * rank
                ps[index] = codecs.orthogonalize(p_buffer[offset:offset + size].view(segment.rows, rank))
                q_locals[index] = codecs.powersgd_q(matrices[index], ps[index])
            else:
                size = segment.numel
                result[segment.start:segment.start + size] = p_buffer[offset:offset + size]
            offset += size
        if q_locals:
            q_buffer = torch.cat([q.reshape(-1) for q in q_locals.values()])
            wait_work(self._all_reduce(q_buffer), deadline - time.monotonic(),
                      f"all_reduce of PowerSGD Q of bucket {bucket_index}")
            self._count_all_reduce(q_buffer)
            offset = 0
            for index, q_local in q_locals.items():
                segment = state.segments[index]
                q_sum = q_buffer[offset:offset + q_local.numel()].view_as(q_local)
                offset += q_local.numel()
                span = slice(segment.start, segment.start + segment.numel)
                result[span] = codecs.decode_powersgd(ps[index], q_sum).reshape(-1)[:segment.numel]
                mine = codecs.decode_powersgd(ps[index], q_local).reshape(-1)[:segment.numel]
                new_residual[span] = matrices[index].reshape(-1)[:segment.numel] - mine
                state.qs[index] = q_sum.clone()
        state.residual = new_residual
        return result


# --------------------------------------------------------------------------- factory

def build_bucket_reducer(config: CompressionConfig, group=None) -> BucketReducer:
    """The bucket reducer for ``config``'s codec (``none``: the plain in-place all_reduce)."""
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"build_bucket_reducer needs a CompressionConfig (see parse_compression), "
                        f"got {type(config).__name__}")
    if config.type == "none":
        return AllreduceReducer(group)
    if config.type in codecs.CAST_DTYPES:
        return CastReducer(codecs.CAST_DTYPES[config.type], group)
    if config.type in GATHERED_CODECS:
        return GatherReducer(config, group)
    return PowerSGDReducer(config, group)
