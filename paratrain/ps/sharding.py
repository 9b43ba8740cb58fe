"""Where each key lives: pure functions, no network.

As in MXNet's KVStore, a key smaller than ``bound`` elements lives whole on one
server, chosen by a stable hash of its name; a larger key is cut into contiguous
slices of its flattened elements, one per server, so that big layers spread their
bandwidth and update work over every server.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Union

#: MXNet's ``MXNET_KVSTORE_BIGARRAY_BOUND`` default, in elements.
DEFAULT_BIGARRAY_BOUND = 1_000_000

Key = Union[int, str]


@dataclass(frozen=True)
class KeySlice:
    """Elements ``[start, stop)`` of a flattened key, held by server ``server``."""

    server: int
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


def key_name(key: Key) -> str:
    """The name a key travels under: ``i:<int>`` or ``s:<str>``, so ``1`` and ``"1"``
    stay different keys."""
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"key={key!r} must be an int or a str")
    return f"i:{key}" if isinstance(key, int) else f"s:{key}"


def server_for_key(key: Key, num_servers: int) -> int:
    """The server that holds a small key whole. crc32 rather than ``hash()``,
    because Python salts string hashes per process and every worker must agree."""
    if num_servers < 1:
        raise ValueError(f"num_servers={num_servers} must be >= 1")
    return zlib.crc32(key_name(key).encode("utf-8")) % num_servers


def split_range(numel: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``[0, numel)`` into ``parts`` contiguous ranges whose sizes differ by at
    most one (the first ``numel % parts`` ranges get the extra element)."""
    if numel < 0 or parts < 1:
        raise ValueError(f"split_range needs numel >= 0 and parts >= 1, got numel={numel}, parts={parts}")
    base, extra = divmod(numel, parts)
    ranges, start = [], 0
    for index in range(parts):
        stop = start + base + (1 if index < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def plan_key(key: Key, numel: int, num_servers: int,
             bound: int = DEFAULT_BIGARRAY_BOUND) -> list[KeySlice]:
    """The slices of a key of ``numel`` elements over ``num_servers`` servers.

    Keys with fewer than ``bound`` elements (or fewer elements than servers) give a
    single slice on :func:`server_for_key`; larger keys give one non-empty slice per
    server, in server order, covering ``[0, numel)`` exactly.
    """
    if numel < 0:
        raise ValueError(f"numel={numel} must be >= 0")
    if bound < 1:
        raise ValueError(f"bound={bound} must be >= 1 element")
    if numel < bound or numel < num_servers or num_servers == 1:
        return [KeySlice(server_for_key(key, num_servers), 0, numel)]
    return [KeySlice(server, start, stop)
            for server, (start, stop) in enumerate(split_range(numel, num_servers))]


def plan_rows(num_rows: int, num_servers: int) -> list[KeySlice]:
    """The row ranges of a row-sparse key (a table of ``num_rows`` rows): contiguous,
    one per server in server order (fewer when there are fewer rows than servers),
    covering ``[0, num_rows)``. ``start``/``stop`` count rows, not elements."""
    if num_rows < 1 or num_servers < 1:
        raise ValueError(f"plan_rows needs num_rows >= 1 and num_servers >= 1, got {num_rows}, {num_servers}")
    return [KeySlice(server, start, stop) for server, (start, stop) in enumerate(split_range(num_rows, num_servers))
            if stop > start]


def largest_message_bytes(tensors, num_servers: int, bound: int = DEFAULT_BIGARRAY_BOUND) -> int:
    """The largest payload a worker sends for these tensors (keys): the biggest slice
    :func:`plan_key` makes of any of them, in bytes. A server's message limit must be
    at least this."""
    largest = 0
    for tensor in tensors:
        numel = tensor.numel()
        slices = plan_key("size", numel, num_servers, bound)
        largest = max(largest, max(part.length for part in slices) * tensor.element_size())
    return largest
