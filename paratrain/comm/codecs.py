"""Gradient codecs: pure functions with explicit error-feedback state.

Every codec turns one worker's fp32 gradient into a smaller *payload* (plain tensors,
ready for a collective or a parameter-server push) and back. Nothing here talks to
the network and nothing keeps hidden state: the caller owns the residual (what was
not sent yet) and, for PowerSGD, the warm-started ``Q``, and passes them in again.

| type | payload | bytes per fp32 entry | error feedback |
|---|---|---|---|
| ``fp16`` / ``bf16`` | the cast tensor | 2 | no |
| ``2bit:t`` | 16 two-bit codes per int32 word (MXNet layout) | 1/4 | residual |
| ``2bit`` | the same codes, plus one fp32 scale per block of 256 | 1/4 + 1/64 | residual |
| ``1bit`` | 32 sign bits per int32 word (MXNet layout) | 1/8 | residual |
| ``topk`` | int32 indices and fp32 values of the largest ``ratio`` entries | 8 * ratio | residual |
| ``powersgd`` | ``P`` (rows x r) and ``Q`` (cols x r) | 4 r (rows + cols) / (rows cols) | residual, warm ``Q`` |
| ``quant:b`` | b-bit integers (b = 4 or 8), one fp32 scale per block of 256 | b/8 + 1/64 | residual |

The one-call helpers :func:`encode` and :func:`decode` cover every type with one
signature, for callers (the parameter-server client) that only move payloads around.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch

from paratrain.errors import ConfigError, check_choice

CODEC_TYPES = ("none", "fp16", "bf16", "2bit", "topk", "powersgd", "quant", "1bit")
CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: 2bit: how many codes one 32-bit word carries on the wire.
CODES_PER_WORD = 16
#: 1bit: how many sign bits one 32-bit word carries on the wire.
BITS_PER_WORD = 32
# MXNet's 2bit code values (src/kvstore/gradient_compression-inl.h): 0b11 is +threshold,
# 0b10 is -threshold, 0b00 sends nothing.
_CODE_POSITIVE = 0b11
_CODE_NEGATIVE = 0b10
# Element i of a 4-element byte sits at these bit offsets: the first one in the
# highest two bits, as MXNet's posbits {0xc0, 0x30, 0x0c, 0x03}.
_BIT_SHIFTS = (6, 4, 2, 0)
#: quant: the widths it offers, and how many entries share one fp32 scale.
QUANT_BITS = (4, 8)
QUANT_BLOCK = 256
#: scaled 2bit (no threshold given): entries per fp32 scale, and Lloyd iterations per scale.
SCALED_2BIT_BLOCK = 256
LLOYD_ITERATIONS = 3


# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class CompressionConfig:
    """Which codec compresses gradients, and its one knob.

    ``threshold`` is for ``2bit`` (a number: MXNet's fixed threshold; None: a scale
    per block that follows the gradient, :func:`encode_2bit_scaled`) and ``1bit`` (any
    number; None: MXNet's default 0), ``ratio`` for ``topk``, ``rank`` (and ``seed``
    for the first random ``Q``, equal on every worker) for ``powersgd``, ``bits`` for
    ``quant``.
    """

    type: str = "none"
    threshold: float | None = None
    ratio: float = 0.01
    rank: int = 2
    seed: int = 0
    bits: int = 8

    def __post_init__(self) -> None:
        check_choice("compression type", self.type, CODEC_TYPES)
        if self.threshold is not None and self.type == "1bit" and not _is_number(self.threshold):
            raise ConfigError(f"compression threshold={self.threshold!r} must be a finite number")
        if self.threshold is not None and self.type != "1bit" and (not _is_number(self.threshold)
                                                                  or not self.threshold > 0):
            raise ConfigError(f"compression threshold={self.threshold!r} must be a number > 0 (or unset: "
                              f"scaled to the gradient)")
        if not _is_number(self.ratio) or not 0 < self.ratio <= 1:
            raise ConfigError(f"compression ratio={self.ratio!r} must be a number in (0, 1]")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"compression rank={self.rank!r} must be an int >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"compression seed={self.seed!r} must be an int")
        if isinstance(self.bits, bool) or self.bits not in QUANT_BITS:
            raise ConfigError(f"compression bits={self.bits!r} must be one of: {', '.join(map(str, QUANT_BITS))}")

    @property
    def enabled(self) -> bool:
        """False for ``none``: gradients travel as plain fp32."""
        return self.type != "none"

    def to_dict(self) -> dict:
        """The MXNet-style dict for this config (only the keys its type uses)."""
        out: dict[str, Any] = {"type": self.type}
        out.update({key: getattr(self, key) for key in _TYPE_KEYS.get(self.type, ())
                    if getattr(self, key) is not None})
        return out


_TYPE_KEYS = {"2bit": ("threshold",), "1bit": ("threshold",), "topk": ("ratio",), "powersgd": ("rank", "seed"),
              "quant": ("bits",)}
# "2bit:0.5" -> threshold, "topk:0.01" -> ratio, "powersgd:2" -> rank, "quant:4" -> bits.
_SHORT_PARAM = {"2bit": ("threshold", float), "1bit": ("threshold", float), "topk": ("ratio", float),
                "powersgd": ("rank", int), "quant": ("bits", int)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_compression(spec: "str | Mapping | CompressionConfig | None") -> CompressionConfig:
    """Read a compression setting from the CLI or from ``kv.set_gradient_compression``.

    Accepts ``None``/``""``/``"none"``; strings ``"fp16"``, ``"bf16"``, ``"2bit"``,
    ``"2bit:0.5"``, ``"topk:0.01"``, ``"powersgd:2"``, ``"quant:4"``; MXNet-style dicts such as
    ``{"type": "2bit", "threshold": 0.5}``; or a :class:`CompressionConfig`.
    """
    if spec is None:
        return CompressionConfig()
    if isinstance(spec, CompressionConfig):
        return spec
    if isinstance(spec, str):
        return _parse_string(spec)
    if isinstance(spec, Mapping):
        return _parse_mapping(spec)
    raise ConfigError(f"compression={spec!r} must be a string like '2bit:0.5', a dict "
                      f"like {{'type': '2bit', 'threshold': 0.5}}, or None")


def _parse_string(text: str) -> CompressionConfig:
    name, sep, param = text.strip().partition(":")
    name = name.strip().lower()
    if name in ("", "none") and not sep:
        return CompressionConfig()
    check_choice("compression type", name, CODEC_TYPES)
    if not sep:
        return CompressionConfig(type=name)
    if name not in _SHORT_PARAM:
        raise ConfigError(f"compression={text!r}: type {name!r} takes no ':' parameter")
    key, kind = _SHORT_PARAM[name]
    try:
        value = kind(param)
    except ValueError:
        raise ConfigError(f"compression={text!r}: {key} {param!r} is not a valid {kind.__name__}") from None
    return CompressionConfig(type=name, **{key: value})


def _parse_mapping(spec: Mapping) -> CompressionConfig:
    if "type" not in spec:
        raise ConfigError(f"compression dict {dict(spec)!r} needs a 'type' key; choose one of: "
                          + ", ".join(CODEC_TYPES))
    name = str(spec["type"]).lower()
    check_choice("compression type", name, CODEC_TYPES)
    allowed = _TYPE_KEYS.get(name, ())
    extra = sorted(set(spec) - {"type", *allowed})
    if extra:
        raise ConfigError(f"compression dict has unknown key(s) {extra} for type {name!r}; "
                          f"allowed: {['type', *allowed]}")
    return CompressionConfig(type=name, **{key: spec[key] for key in allowed if key in spec})


# --------------------------------------------------------------------------- fp16, bf16

def encode_cast(grad: torch.Tensor, dtype: torch.dtype, *, scale: float = 1.0) -> torch.Tensor:
    """``grad * scale`` in ``dtype`` (fp16 callers pre-scale by 1/world_size so that
    a sum of ``world_size`` payloads cannot overflow fp16's 65504)."""
    scaled = grad.float() * scale if scale != 1.0 else grad.float()
    return scaled.to(dtype)


def decode_cast(payload: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """The fp32 value of a cast payload, undoing ``scale``."""
    out = payload.float()
    return out / scale if scale != 1.0 else out


# --------------------------------------------------------------------------- 2bit

def quantize_2bit(grad: torch.Tensor, residual: torch.Tensor, threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """MXNet's 2bit rule. Returns ``(codes, new_residual)``; codes are int8 in
    {-1, 0, +1}.

    ``acc = residual + grad``; ``acc >= threshold`` sends +threshold, ``acc <= -threshold``
    sends -threshold, anything between sends 0; what was not sent stays in the residual.
    """
    acc = residual.float() + grad.float()
    codes = (acc >= threshold).to(torch.int8) - (acc <= -threshold).to(torch.int8)
    return codes, acc - codes.float() * threshold


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in {-1, 0, +1} into int32 words, 16 codes per word, in MXNet's
    memory layout (element i of a block in byte i // 4, the first of each byte in the
    high bits; words little-endian as on x86). Pads with zero codes."""
    flat = codes.reshape(-1)
    fields = torch.zeros(_round_up(flat.numel(), CODES_PER_WORD), dtype=torch.uint8, device=flat.device)
    # +1 -> 0b11, -1 -> 0b10, 0 -> 0b00, without branching per element
    fields[: flat.numel()] = (flat != 0).to(torch.uint8) * 2 + (flat > 0).to(torch.uint8)
    per_byte = fields.view(-1, 4)
    packed_bytes = ((per_byte[:, 0] << _BIT_SHIFTS[0]) | (per_byte[:, 1] << _BIT_SHIFTS[1])
                    | (per_byte[:, 2] << _BIT_SHIFTS[2]) | per_byte[:, 3])
    return packed_bytes.view(torch.int32)


def _byte_to_codes() -> torch.Tensor:
    """(256, 4) int8: the four codes every possible packed byte holds."""
    byte = torch.arange(256, dtype=torch.int32).unsqueeze(1)
    fields = (byte >> torch.tensor(_BIT_SHIFTS, dtype=torch.int32)) & 0b11
    return (fields == _CODE_POSITIVE).to(torch.int8) - (fields == _CODE_NEGATIVE).to(torch.int8)


# Decoding is one table lookup per byte: several times faster than shifting and
# masking every field, and decoding N payloads per step is on the critical path.
_BYTE_TO_CODES = _byte_to_codes()


def unpack_2bit(words: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_2bit`: int8 codes in {-1, 0, +1}, ``numel`` of them."""
    if words.dtype != torch.int32:
        raise TypeError(f"2bit payload must be int32 words, got {words.dtype}")
    if numel > words.numel() * CODES_PER_WORD:
        raise ValueError(f"2bit payload of {words.numel()} words cannot hold {numel} codes")
    packed_bytes = words.contiguous().view(torch.uint8).long()
    return _BYTE_TO_CODES.to(words.device)[packed_bytes].reshape(-1)[:numel]


def encode_2bit(grad: torch.Tensor, residual: torch.Tensor, threshold: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize and pack: ``(int32 words, new_residual)``."""
    codes, new_residual = quantize_2bit(grad.reshape(-1), residual.reshape(-1), threshold)
    return pack_2bit(codes), new_residual.view_as(residual)


def decode_2bit(words: torch.Tensor, numel: int, threshold: float) -> torch.Tensor:
    """The fp32 gradient a 2bit payload stands for (entries are -t, 0 or +t)."""
    table = _BYTE_TO_CODES.to(words.device).float() * threshold
    return table[words.contiguous().view(torch.uint8).long()].reshape(-1)[:numel]


# --------------------------------------------------------------------------- 2bit, scaled

def scaled_2bit_words(numel: int) -> int:
    """Payload length (int32 words) of a scaled 2bit tensor: the codes, then one
    fp32 scale per block of :data:`SCALED_2BIT_BLOCK` entries."""
    return -(-numel // CODES_PER_WORD) + -(-numel // SCALED_2BIT_BLOCK)


def ternary_scales(blocks: torch.Tensor, iterations: int = LLOYD_ITERATIONS) -> torch.Tensor:
    """Per row of ``blocks``, the scale ``v`` of the least-squares fit of the row by
    ``{-v, 0, +v}`` (entries with ``|x| >= v/2`` become ``+-v``): Lloyd's iteration
    (threshold at half the scale, scale the mean magnitude of what passes) from
    ``v = 2 mean|x|``. A fixed number of iterations keeps it cheap and deterministic.
    Returns shape ``(rows, 1)``; rows of zeros get 0."""
    magnitude = blocks.abs()
    scale = magnitude.mean(dim=1, keepdim=True) * 2
    for _ in range(iterations):
        passes = (magnitude >= scale / 2).float()
        scale = (magnitude * passes).sum(dim=1, keepdim=True) / passes.sum(dim=1, keepdim=True).clamp(min=1)
    return scale


def encode_2bit_scaled(grad: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2bit whose threshold follows the gradient: MXNet's codes and layout for
    ``acc = residual + grad``, but each block of :data:`SCALED_2BIT_BLOCK` entries
    carries its own scale ``v`` (:func:`ternary_scales`), entries with ``|acc| >=
    v/2`` send ``+-v``, and the rest stays in the residual. The fit is as close as
    three levels allow wherever the gradients' scale is, so the residual stays small
    and the error feedback has little stale gradient to deliver late (which a
    momentum buffer turns into overshoot). Returns ``(int32 [codes | scales' bits],
    new_residual)``."""
    acc = residual.reshape(-1).float() + grad.reshape(-1).float()
    numel = acc.numel()
    blocks = -(-numel // SCALED_2BIT_BLOCK)
    padded = torch.zeros(blocks * SCALED_2BIT_BLOCK, device=acc.device)
    padded[:numel] = acc
    rows = padded.view(blocks, SCALED_2BIT_BLOCK)
    scales = ternary_scales(rows)
    codes = ((rows >= scales / 2).to(torch.int8) - (rows <= -scales / 2).to(torch.int8)) * (scales > 0).to(torch.int8)
    sent = (codes.float() * scales).reshape(-1)[:numel]
    payload = torch.cat([pack_2bit(codes.reshape(-1)[:numel]), scales.reshape(-1).contiguous().view(torch.int32)])
    return payload, (acc - sent).view_as(residual)


def decode_2bit_scaled(payload: torch.Tensor, numel: int) -> torch.Tensor:
    """The fp32 tensor of ``numel`` entries a scaled 2bit payload stands for."""
    if payload.dtype != torch.int32 or payload.numel() != scaled_2bit_words(numel):
        raise ValueError(f"scaled 2bit payload of {numel} entries must be {scaled_2bit_words(numel)} int32 words, "
                         f"got {payload.numel()} x {payload.dtype}")
    code_words = -(-numel // CODES_PER_WORD)
    scales = payload[code_words:].contiguous().view(torch.float32)
    return unpack_2bit(payload[:code_words], numel).float() * scales.repeat_interleave(SCALED_2BIT_BLOCK)[:numel]
# --------------------------------------------------------------------------- 1bit

def quantize_1bit(grad: torch.Tensor, residual: torch.Tensor, threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """MXNet's 1bit rule (src/kvstore/gradient_compression-inl.h): ``acc = residual +
    grad``; ``acc > threshold`` sends +1 (and keeps ``acc - 1``), anything else sends
    -1 (and keeps ``acc + 1``). Returns ``(bits, new_residual)``, bits bool (True: +1)."""
    acc = residual.float() + grad.float()
    bits = acc > threshold
    return bits, acc - (bits.float() * 2 - 1)


def pack_1bit(bits: torch.Tensor) -> torch.Tensor:
    """Bools into int32 words, 32 per word, in MXNet's layout: element i in byte i // 8,
    the first of each byte in its highest bit (mask 0x80); padded with zeros."""
    flat = bits.reshape(-1).to(torch.uint8)
    padded = torch.zeros(_round_up(flat.numel(), BITS_PER_WORD), dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8).view(torch.int32)


def unpack_1bit(words: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_1bit`: ``numel`` bools."""
    if words.dtype != torch.int32:
        raise TypeError(f"1bit payload must be int32 words, got {words.dtype}")
    if numel > words.numel() * BITS_PER_WORD:
        raise ValueError(f"1bit payload of {words.numel()} words cannot hold {numel} bits")
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=words.device)
    return ((words.contiguous().view(torch.uint8).unsqueeze(1) >> shifts) & 1).reshape(-1)[:numel].bool()


def encode_1bit(grad: torch.Tensor, residual: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize and pack: ``(int32 words, new_residual)``."""
    bits, new_residual = quantize_1bit(grad.reshape(-1), residual.reshape(-1), threshold)
    return pack_1bit(bits), new_residual.view_as(residual)


def decode_1bit(words: torch.Tensor, numel: int) -> torch.Tensor:
    """The fp32 gradient a 1bit payload stands for: +1 or -1 per entry (MXNet's)."""
    return unpack_1bit(words, numel).float() * 2 - 1


# --------------------------------------------------------------------------- topk

def topk_count(numel: int, ratio: float) -> int:
    """How many entries topk sends: ``ceil(ratio * numel)``, at least one."""
    return min(numel, max(1, math.ceil(ratio * numel)))


def encode_topk(grad: torch.Tensor, residual: torch.Tensor, ratio: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``topk_count`` entries of ``residual + grad`` largest in magnitude.

    Returns ``(indices int32, values fp32, new_residual)``; the residual keeps every
    entry that was not sent.
    """
    acc = residual.reshape(-1).float() + grad.reshape(-1).float()
    if acc.numel() >= 2 ** 31:
        raise ValueError(f"topk indices are int32; a tensor of {acc.numel()} entries is too large")
    _, indices = acc.abs().topk(topk_count(acc.numel(), ratio), sorted=False)
    indices, _ = indices.sort()  # a fixed order makes payloads comparable across runs
    values = acc[indices]
    acc[indices] = 0.0
    return indices.to(torch.int32), values, acc.view_as(residual)


def decode_topk(indices: torch.Tensor, values: torch.Tensor, numel: int) -> torch.Tensor:
    """The dense fp32 gradient of ``numel`` entries that a topk payload stands for."""
    out = torch.zeros(numel, dtype=torch.float32, device=values.device)
    out[indices.long()] = values.float()
    return out


def pack_topk(indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One int32 tensor ``[indices | values' bits]`` so a single collective moves both."""
    return torch.cat([indices.to(torch.int32), values.float().contiguous().view(torch.int32)])


def unpack_topk(payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_topk`."""
    if payload.dtype != torch.int32 or payload.numel() % 2:
        raise ValueError(f"topk payload must be int32 of even length, got {payload.dtype} "
                         f"of {payload.numel()}")
    half = payload.numel() // 2
    return payload[:half], payload[half:].contiguous().view(torch.float32)


# --------------------------------------------------------------------------- powersgd

def matrix_shape(numel: int) -> tuple[int, int]:
    """A near-square ``(rows, cols)`` with ``rows * cols >= numel``, for a flat tensor
    whose layer shapes are unknown."""
    cols = max(1, math.ceil(math.sqrt(numel)))
    return math.ceil(numel / cols), cols


def initial_q(cols: int, rank: int, seed: int) -> torch.Tensor:
    """The first ``Q`` (cols x rank): random normal from ``seed``, so every worker
    starts from the same ``Q`` without talking."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(cols, rank, generator=generator)


def orthogonalize(matrix: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``matrix``'s columns (reduced QR)."""
    q, _ = torch.linalg.qr(matrix, mode="reduced")
    return q


def powersgd_p(m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """First half of a power iteration: ``P = M Q`` (summed over workers next)."""
    return m @ q


def powersgd_q(m: torch.Tensor, p_orthonormal: torch.Tensor) -> torch.Tensor:
    """Second half: ``Q = M^T P`` with the shared orthonormal ``P``; its sum over
    workers is the next warm-start ``Q``."""
    return m.t() @ p_orthonormal


def decode_powersgd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The low-rank matrix ``P Q^T`` a PowerSGD payload stands for."""
    return p @ q.t()


def encode_powersgd(grad_matrix: torch.Tensor, residual: torch.Tensor, q: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One worker's PowerSGD step with nobody to sum with (parameter-server pushes).

    ``M = grad + residual``; ``P = orth(M Q)``; ``Q' = M^T P``. Returns
    ``(P, Q', new_residual)`` with ``new_residual = M - P Q'^T``; pass ``Q'`` back in
    as the next warm start. Across workers, :mod:`paratrain.parallel.compressed`
    sums ``M Q`` before the QR and ``Q'`` after it instead.
    """
    m = grad_matrix.float() + residual.float()
    p = orthogonalize(powersgd_p(m, q))
    q_next = powersgd_q(m, p)
    return p, q_next, m - decode_powersgd(p, q_next)


# --------------------------------------------------------------------------- quant

def quant_levels(bits: int) -> int:
    """Largest code magnitude of a ``bits``-bit symmetric quantiser (7 or 127)."""
    check_choice("quant bits", bits, QUANT_BITS)
    return 2 ** (bits - 1) - 1


def quant_words(numel: int, bits: int) -> int:
    """Payload length (int32 words): one fp32 scale per block, then the codes."""
    return -(-numel // QUANT_BLOCK) + -(-numel * bits // 32)


def encode_quant(grad: torch.Tensor, residual: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``acc = residual + grad`` to ``bits``-bit integers, each block of
    :data:`QUANT_BLOCK` entries scaled by its largest magnitude (so ``|code| <=
    quant_levels(bits)``); what rounding lost stays in the residual. Returns
    ``(int32 [scales' bits | packed codes], new_residual)``: codes are offset to be
    unsigned, two per byte (4 bits, the first in the low nibble) or one per byte."""
    levels = quant_levels(bits)
    acc = residual.reshape(-1).float() + grad.reshape(-1).float()
    numel, blocks = acc.numel(), -(-acc.numel() // QUANT_BLOCK)
    padded = torch.zeros(blocks * QUANT_BLOCK, device=acc.device)
    padded[:numel] = acc
    scales = padded.view(blocks, QUANT_BLOCK).abs().amax(dim=1) / levels
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (padded.view(blocks, QUANT_BLOCK) / safe.unsqueeze(1)).round().clamp(-levels, levels)
    sent = (codes * scales.unsqueeze(1)).reshape(-1)[:numel]
    unsigned = (codes.reshape(-1)[:numel] + levels).to(torch.uint8)
    return torch.cat([scales.view(torch.int32), _pack_codes(unsigned, bits)]), (acc - sent).view_as(residual)


def decode_quant(payload: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """The fp32 tensor of ``numel`` entries a quant payload stands for."""
    levels, blocks = quant_levels(bits), -(-numel // QUANT_BLOCK)
    if payload.dtype != torch.int32 or payload.numel() != quant_words(numel, bits):
        raise ValueError(f"quant:{bits} payload of {numel} entries must be {quant_words(numel, bits)} int32 words, "
                         f"got {payload.numel()} x {payload.dtype}")
    scales = payload[:blocks].contiguous().view(torch.float32)
    codes = _unpack_codes(payload[blocks:], numel, bits).float() - levels
    return codes * scales.repeat_interleave(QUANT_BLOCK)[:numel]


def _pack_codes(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = 32 // bits
    fields = torch.zeros(_round_up(unsigned.numel(), per_word), dtype=torch.uint8, device=unsigned.device)
    fields[:unsigned.numel()] = unsigned
    if bits == 4:
        pairs = fields.view(-1, 2)
        fields = pairs[:, 0] | (pairs[:, 1] << 4)
    return fields.view(torch.int32)


def _unpack_codes(words: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    packed = words.contiguous().view(torch.uint8)
    if bits == 4:
        packed = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
    return packed[:numel]


# --------------------------------------------------------------------------- one-call API

@dataclass
class CodecState:
    """Error-feedback state of one tensor under one codec (owned by the caller)."""

    residual: torch.Tensor | None = None
    q: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)


def encode(config: CompressionConfig, grad: torch.Tensor, state: CodecState | None = None
           ) -> tuple[list[torch.Tensor], CodecState]:
    """Encode ``grad`` (any shape; treated as flat) with ``config``'s codec.

    Returns ``(payload, new_state)``: a list of plain tensors to send, and the state to
    pass to the next call for the same tensor. :func:`decode` reverses it.
    """
    flat = grad.detach().reshape(-1).float()
    state = state or CodecState()
    residual = state.residual if state.residual is not None else torch.zeros_like(flat)
    if config.type == "none":
        return [flat.clone()], state
    if config.type in CAST_DTYPES:
        return [encode_cast(flat, CAST_DTYPES[config.type])], state
    if config.type == "2bit":
        words, residual = (encode_2bit_scaled(flat, residual) if config.threshold is None
                           else encode_2bit(flat, residual, config.threshold))
        return [words], replace(state, residual=residual)
    if config.type == "quant":
        words, residual = encode_quant(flat, residual, config.bits)
        return [words], replace(state, residual=residual)
    if config.type == "1bit":
        words, residual = encode_1bit(flat, residual, 0.0 if config.threshold is None else config.threshold)
        return [words], replace(state, residual=residual)
    if config.type == "topk":
        indices, values, residual = encode_topk(flat, residual, config.ratio)
        return [pack_topk(indices, values)], replace(state, residual=residual)
    rows, cols = matrix_shape(flat.numel())
    q = state.q if state.q is not None else initial_q(cols, min(config.rank, rows, cols), config.seed).to(flat.device)
    padded = torch.zeros(rows * cols, device=flat.device)
    padded[: flat.numel()] = flat + residual
    p, q_next, new_residual = encode_powersgd(padded.view(rows, cols), torch.zeros(rows, cols, device=flat.device), q)
    return [p, q_next], replace(state, residual=new_residual.reshape(-1)[: flat.numel()], q=q_next)


def decode(config: CompressionConfig, payload: list[torch.Tensor], numel: int) -> torch.Tensor:
    """The flat fp32 gradient of ``numel`` entries that :func:`encode`'s payload stands for."""
    if config.type == "none" or config.type in CAST_DTYPES:
        return decode_cast(payload[0])
    if config.type == "2bit":
        return (decode_2bit_scaled(payload[0], numel) if config.threshold is None
                else decode_2bit(payload[0], numel, config.threshold))
    if config.type == "quant":
        return decode_quant(payload[0], numel, config.bits)
    if config.type == "1bit":
        return decode_1bit(payload[0], numel)
    if config.type == "topk":
        return decode_topk(*unpack_topk(payload[0]), numel)
    return decode_powersgd(payload[0], payload[1]).reshape(-1)[:numel].clone()


def payload_nbytes(payload: list[torch.Tensor]) -> int:
    """Bytes a payload occupies on the wire."""
    return sum(t.numel() * t.element_size() for t in payload)


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
