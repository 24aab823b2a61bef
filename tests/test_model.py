"""The UNet's attention: on CPU the plain softmax(q k^T / sqrt(d)) v, which must equal PyTorch's fused kernel."""

import pytest
import torch
import torch.nn.functional as F

from mnist_diff.diffusion.unet import Attention, UNet


def with_fused_kernel(block: Attention, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    q, k, v = block.qkv(block.norm(x)).reshape(b, 3, block.heads, c // block.heads, h * w).transpose(-1, -2).unbind(1)
    return x + block.out(F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w))


@pytest.mark.parametrize("bf16", [False, True])
def test_cpu_attention_is_scaled_dot_product_attention(bf16):
    torch.manual_seed(0)
    block = Attention(16).eval()
    torch.nn.init.normal_(block.out.weight)  # zero-initialised, the block would be the identity
    x = torch.randn(3, 16, 7, 7)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        got, expected = block(x), with_fused_kernel(block, x)
    tol = 3e-2 if bf16 else 1e-5
    assert got.shape == x.shape and got.dtype == expected.dtype
    assert torch.allclose(got.float(), expected.float(), atol=tol, rtol=tol)
    assert not torch.allclose(got.float(), x, atol=0.1)  # the attention really changed its input


def test_unet_maps_images_to_noise_of_their_shape():
    out = UNet(channels=8)(torch.randn(2, 1, 28, 28), torch.tensor([0, 999]))
    assert out.shape == (2, 1, 28, 28)
