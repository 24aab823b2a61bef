import pytest
import torch

from mnist_diff.diffusion.forward import predict_x0, q_posterior, q_sample
from mnist_diff.diffusion.schedules import make_schedule


def test_q_sample_moments():
    s = make_schedule("linear", 1000, 1e-4, 0.02)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    for t_int in (0, 250, 999):
        t = torch.full((x0.shape[0],), t_int)
        xt = q_sample(s, x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
        ab = float(s.alphas_cumprod[t_int])
        assert float(xt.mean()) == pytest.approx(0.7 * ab**0.5, abs=4e-3)
        assert float(xt.var()) == pytest.approx(1 - ab, rel=1e-2, abs=1e-4)


def test_posterior_matches_gaussian_conditioning():
    """q(x_{t-1} | x_t, x_0) by completing the square: q(x_t | x_{t-1}) q(x_{t-1} | x_0) is a product of
    Gaussians in x_{t-1}, with precision 1/(1 - ab_{t-1}) + alpha_t / beta_t."""
    s = make_schedule("quadratic", 200, 1e-4, 0.08)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64)
    xt = torch.randn(5, 1, 4, 4, generator=gen, dtype=torch.float64)
    for t_int in (1, 17, 199):
        t = torch.full((5,), t_int)
        mean, var = q_posterior(s, x0, xt, t)
        beta, ab_prev = float(s.betas[t_int]), float(s.alphas_cumprod[t_int - 1])
        precision = 1 / (1 - ab_prev) + (1 - beta) / beta
        ref_var = 1 / precision
        ref_mean = ref_var * (ab_prev**0.5 * x0 / (1 - ab_prev) + (1 - beta) ** 0.5 * xt / beta)
        assert float(var.flatten()[0]) == pytest.approx(ref_var, rel=1e-10)
        assert torch.allclose(mean, ref_mean, rtol=1e-10, atol=1e-12)


def test_predict_x0_inverts_q_sample():
    s = make_schedule("sigmoid", 200, 1e-4, 0.08)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(8, 1, 28, 28, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 200, (8,), generator=gen)
    assert torch.allclose(predict_x0(s, q_sample(s, x0, t, noise), t, noise), x0, atol=1e-9)
