"""A compact time-conditioned UNet for 1x28x28 images: 28 -> 14 -> 7, self-attention at 7x7.

Default width 64 (2.9M parameters): small enough that a 20-epoch MNIST run is minutes on one GPU, wide
enough for clean digits; its throughput is measured by `cli.py bench` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Transformer / DDPM), [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads if channels % heads == 0 else 1
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        if x.is_cuda:  # fused flash / memory-efficient kernels
            y = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        else:  # PyTorch's CPU kernel checks every row for masking: ~20% of a width-8 UNet's bf16 time at 49 tokens
            y = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """eps_theta(x_t, t). Widths per level: c, 2c, 2c; one ResBlock per level on each side."""

    def __init__(self, *, channels: int = 64, in_channels: int = 1):
        super().__init__()
        c = channels
        emb = 4 * c
        self.channels = c
        self.time_mlp = nn.Sequential(nn.Linear(c, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(in_channels, c, 3, padding=1)
        self.down1 = ResBlock(c, c, emb)  # 28x28
        self.pool1 = nn.Conv2d(c, c, 3, stride=2, padding=1)  # -> 14x14
        self.down2 = ResBlock(c, 2 * c, emb)
        self.pool2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)  # -> 7x7
        self.down3 = ResBlock(2 * c, 2 * c, emb)
        self.mid1, self.mid_attn, self.mid2 = ResBlock(2 * c, 2 * c, emb), Attention(2 * c), ResBlock(2 * c, 2 * c, emb)
        self.up3 = ResBlock(4 * c, 2 * c, emb)
        self.up3_attn = Attention(2 * c)
        self.unpool2 = nn.ConvTranspose2d(2 * c, 2 * c, 4, stride=2, padding=1)  # 7 -> 14
        self.up2 = ResBlock(4 * c, c, emb)
        self.unpool1 = nn.ConvTranspose2d(c, c, 4, stride=2, padding=1)  # 14 -> 28
        self.up1 = ResBlock(2 * c, c, emb)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.channels))
        h1 = self.down1(self.conv_in(x), emb)
        h2 = self.down2(self.pool1(h1), emb)
        h3 = self.down3(self.pool2(h2), emb)
        h = self.mid2(self.mid_attn(self.mid1(h3, emb)), emb)
        h = self.up3_attn(self.up3(torch.cat([h, h3], 1), emb))
        h = self.up2(torch.cat([self.unpool2(h), h2], 1), emb)
        h = self.up1(torch.cat([self.unpool1(h), h1], 1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
