"""A compact time-conditioned UNet for 1x28x28 images: 28 -> 14 -> 7, self-attention at 7x7.

Default width 64 (2.9M parameters): small enough that a 20-epoch MNIST run is minutes on one GPU, wide
enough for clean digits; its throughput is measured by `cli.py bench` (docs/BENCHMARKS.md).

Two forwards of the same parameters: the eager one (the reference) and, with `UNet.fused`, one that moves fewer
bytes on a GPU (docs/speed.md#the-fused-forward): GroupNorm + SiLU (+ the time-embedding add) as one function
that inductor fuses into one pass, 1-channel convolutions padded to 8 channels for the tensor cores, attention
through `scaled_dot_product_attention` on the channels-last layout. Same math up to rounding; checkpoints are
interchangeable.
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


def group_norm_act(
    x: torch.Tensor, norm: nn.GroupNorm, emb: torch.Tensor | None = None, act: bool = True
) -> torch.Tensor:
    """silu(norm(x + emb[:, :, None, None])) in one function, in x's dtype: what the eager blocks compute in two
    or three passes (plus autocast's casts). Statistics and the affine in fp32 whatever x's dtype (bf16 under
    autocast); the group split is a view, so a channels-last x is never copied to another layout."""
    b, c, h, w = x.shape
    xf = x.float()
    if emb is not None:  # the block's h + emb, never written out: only the norm reads it
        xf = xf + emb.float()[:, :, None, None]
    groups = xf.reshape(b, norm.num_groups, c // norm.num_groups, h, w)  # a view for NCHW and channels-last
    var, mean = torch.var_mean(groups, dim=(2, 3, 4), keepdim=True, correction=0)
    y = ((groups - mean) * torch.rsqrt(var + norm.eps)).reshape(b, c, h, w)
    y = y * norm.weight.float()[:, None, None] + norm.bias.float()[:, None, None]
    return (F.silu(y) if act else y).to(x.dtype)


def padded_conv(x: torch.Tensor, conv: nn.Conv2d, memory_format=torch.contiguous_format, multiple: int = 8):
    """conv(x) with its input and output channels zero-padded to a multiple of 8: zero input channels with zero
    weights add nothing and the extra outputs are dropped, so the sums are conv's; but cuDNN runs the shapes on
    tensor cores, where a 1-channel convolution takes a legacy kernel (0.33 ms a step at width 64 on an H100)."""
    weight, bias = conv.weight, conv.bias
    c_out, c_in = weight.shape[:2]
    pad_in, pad_out = -c_in % multiple, -c_out % multiple
    if pad_in:
        x = F.pad(x, (0, 0, 0, 0, 0, pad_in))
        weight = F.pad(weight, (0, 0, 0, 0, 0, pad_in))
    if pad_out:
        weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, pad_out))
        bias = F.pad(bias, (0, pad_out))
    x, weight = x.contiguous(memory_format=memory_format), weight.contiguous(memory_format=memory_format)
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return y[:, :c_out].contiguous(memory_format=memory_format) if pad_out else y


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:
            h = self.conv1(group_norm_act(x, self.norm1))
            h = self.conv2(group_norm_act(h, self.norm2, self.emb(emb)))
            return self.skip(x) + h
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

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:
            return self._fused(x)
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        if x.is_cuda:  # fused flash / memory-efficient kernels
            y = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        else:  # PyTorch's CPU kernel checks every row for masking: ~20% of a width-8 UNet's bf16 time at 49 tokens
            y = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        # The 1x1 convolutions as matrix products on the [b, hw, c] view of channels-last memory: q, k and v are
        # views of one qkv tensor (no transposing copies), as is the output the out projection reads.
        b, c, h, w = x.shape
        d = c // self.heads
        tokens = group_norm_act(x, self.norm, act=False).permute(0, 2, 3, 1).reshape(b, h * w, c)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)  # [b, hw, 3c]
        q, k, v = qkv.view(b, h * w, 3, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # [b, heads, hw, d]
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        y = F.linear(y, self.out.weight.flatten(1), self.out.bias)
        return x + y.view(b, h, w, c).permute(0, 3, 1, 2)


class UNet(nn.Module):
    """eps_theta(x_t, t). Widths per level: c, 2c, 2c; one ResBlock per level on each side. `fused`: the fused
    forward (module docstring); a plain attribute, not state, so it may be switched on a built or loaded model."""

    def __init__(self, *, channels: int = 64, in_channels: int = 1, fused: bool = False):
        super().__init__()
        self.fused = fused
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
        f = self.fused
        emb = self.time_mlp(timestep_embedding(t, self.channels))
        if f:  # the layout the model's weights are in (channels-last on CUDA, see runtime.accel.device_layout)
            cl = self.pool1.weight.is_contiguous(memory_format=torch.channels_last)
            layout = torch.channels_last if cl else torch.contiguous_format
            h1 = self.down1(padded_conv(x, self.conv_in, layout), emb, f)
        else:
            h1 = self.down1(self.conv_in(x), emb)
        h2 = self.down2(self.pool1(h1), emb, f)
        h3 = self.down3(self.pool2(h2), emb, f)
        h = self.mid2(self.mid_attn(self.mid1(h3, emb, f), f), emb, f)
        h = self.up3_attn(self.up3(torch.cat([h, h3], 1), emb, f), f)
        h = self.up2(torch.cat([self.unpool2(h), h2], 1), emb, f)
        h = self.up1(torch.cat([self.unpool1(h), h1], 1), emb, f)
        if f:
            return padded_conv(group_norm_act(h, self.norm_out), self.conv_out, layout)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
