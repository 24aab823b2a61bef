import math

import torch
import torch.nn.functional as F

from mnist_diff.model import UNet, attention


def test_cpu_attention_equals_sdpa_and_the_definition():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 49, 8, generator=gen, dtype=torch.float64) * 3 for _ in range(3))
    ours = attention(q, k, v)
    assert torch.allclose(ours, F.scaled_dot_product_attention(q, k, v), atol=1e-10)
    # one row by hand: softmax over the 49 keys of q.k / sqrt(8)
    scores = [float(q[1, 2, 5] @ k[1, 2, j]) / math.sqrt(8) for j in range(49)]
    top = max(scores)
    w = torch.tensor([math.exp(s - top) for s in scores], dtype=torch.float64)
    assert torch.allclose(ours[1, 2, 5], (w / w.sum()) @ v[1, 2], atol=1e-10)


def test_unet_keeps_the_shape_and_never_mixes_images():
    model = UNet(channels=8).eval()
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 10, 999])
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # rows never mix (GroupNorm and attention are per image): one image alone gives its row of the batch
    with torch.no_grad():
        alone = model(x[1:2], t[1:2])
    assert torch.allclose(alone, out[1:2], atol=1e-5)
