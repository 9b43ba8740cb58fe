"""Decoding a compressed push on a server, after checking that its payload is exactly
what the job's codec produces (a pure function over :mod:`paratrain.comm.codecs`)."""
from __future__ import annotations

import torch

from paratrain.comm import codecs
from paratrain.ps.protocol import Message, RequestRejected

#: Codecs whose payload a server can decode one key slice at a time.
SERVER_CODECS = ("fp16", "bf16", "2bit", "topk", "1bit")


def decode_push(config: codecs.CompressionConfig | None, message: Message, numel: int) -> torch.Tensor:
    """The fp32 gradient of a compressed push of ``numel`` entries."""
    if config is None:
        raise RequestRejected("compressed push, but no compression was set (kv.set_gradient_compression)")
    payload = message.tensor()
    kind = config.type
    if kind in codecs.CAST_DTYPES:
        expected = (codecs.CAST_DTYPES[kind], numel)
    elif kind == "2bit" and config.threshold is None:
        expected = (torch.int32, codecs.scaled_2bit_words(numel))
    elif kind == "2bit":
        expected = (torch.int32, -(-numel // codecs.CODES_PER_WORD))
    elif kind == "1bit":
        expected = (torch.int32, -(-numel // codecs.BITS_PER_WORD))
    else:
        expected = (torch.int32, 2 * codecs.topk_count(numel, config.ratio))
    if (payload.dtype, payload.numel()) != expected:
        raise RequestRejected(f"{kind} push of {numel} entries must carry {expected[1]} x {expected[0]}, "
                              f"got {payload.numel()} x {payload.dtype}")
    if kind == "topk":
        indices, values = codecs.unpack_topk(payload)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise RequestRejected(f"topk push has indices outside [0, {numel})")
        return codecs.decode_topk(indices, values, numel)
    return codecs.decode(config, [payload], numel)
