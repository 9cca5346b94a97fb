"""Transformer encoder over one window: x (B, T, V) -> h0 (B, T * d_model), paper eq. 8."""
from __future__ import annotations

import functools
import math

import torch
from torch import nn


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal positions (Vaswani et al., 2017)."""

    def __init__(self, d_model: int, max_len: int = 4096):
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)[:, : d_model // 2]
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[: x.size(1)]


@functools.lru_cache(maxsize=None)
def bf16_native(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively: a CUDA GPU with bf16, a CPU with AVX-512 BF16
    or AMX. Elsewhere bf16 is emulated, slower than fp32, and scoring stays in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


class TransformerEncoder(nn.Module):
    def __init__(self, n_features: int, seq_len: int, d_model: int, n_heads: int, n_layers: int,
                 d_ff: int, dropout: float):
        super().__init__()
        self.embed = nn.Linear(n_features, d_model)
        self.pos = PositionalEncoding(d_model, max(seq_len, 64))
        layer = nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.out_dim = seq_len * d_model

    def forward(self, x: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        """bf16: the layers under bf16 autocast where the device runs it natively (scoring only,
        PUAD.reconstruct: about 1.5x faster on such a CPU, scores as fp32's, docs/decisions.md)."""
        with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16 and bf16_native(x.device)):
            h = self.layers(self.pos(self.embed(x)))
        return self.norm(h.float()).flatten(1)  # every time step's state feeds h0
