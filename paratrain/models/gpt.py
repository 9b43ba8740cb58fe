"""A small decoder-only transformer in the style of GPT-2 / nanoGPT.

Pre-LayerNorm blocks, causal self-attention through ``F.scaled_dot_product_attention``,
and an output head tied to the token embedding (one Parameter). Module names follow
GPT-2 (``transformer.wte``, ``transformer.h.0``, ..., ``lm_head``) so that split points
such as ``transformer.h.2`` mean the same here as in a transformers ``GPT2LMHeadModel``.
``forward`` has no data-dependent control flow, so ``torch.export`` can trace it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from paratrain.errors import ConfigError

LN2 = math.log(2.0)


@dataclass(kw_only=True)
class GPTConfig:
    """Shape of a :class:`GPT`. ``context`` is the longest sequence it accepts."""

    vocab_size: int = 256
    context: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"GPTConfig.{name}={value!r} must be an integer >= 1")
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout={self.dropout!r} must be a number in [0, 1)")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"GPTConfig.bias={self.bias!r} must be True or False")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t only."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(batch, length, width)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The position-wise feed-forward layer: 4x wider, GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids ``(B, T)`` in, next-token logits ``(B, T, vocab_size)`` out."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.context, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # Tie after init: the one Parameter keeps the embedding's N(0, 0.02) values.
        self.lm_head.weight = self.transformer.wte.weight
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), so the residual
        # stream's variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Distinct parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        if length > self.config.context:
            raise ConfigError(f"sequence length {length} exceeds GPTConfig.context={self.config.context}")
        positions = torch.arange(length, device=input_ids.device)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def build_gpt(config: GPTConfig | None = None, *, seed: int | None = None, **overrides) -> GPT:
    """A :class:`GPT` from ``config`` (default :class:`GPTConfig`) with field ``overrides``;
    ``seed`` fixes its initial weights."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(GPTConfig)})
    if unknown:
        raise ConfigError(f"unknown GPTConfig field(s) {unknown}; allowed: "
                          f"{', '.join(f.name for f in dataclasses.fields(GPTConfig))}")
    config = GPTConfig(**overrides) if config is None else dataclasses.replace(config, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    return GPT(config)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in nats, over all ``B * T`` positions: ``logits (B, T, V)``,
    ``targets (B, T)``. ``reduction`` is ``"mean"`` (per token) or ``"sum"``."""
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"reduction={reduction!r} is not allowed; choose one of: mean, sum")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


def bits_per_byte(nats_per_byte: float) -> float:
    """Convert a byte-level loss in nats per byte to bits per byte."""
    return nats_per_byte / LN2
