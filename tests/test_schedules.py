import math

import pytest
import torch

from mnist_diff.diffusion.schedules import SCHEDULES, make_betas, make_schedule

STUDY = [(200, 0.08), (1000, 0.02)]

# alpha_bar at T for the study's 8 settings (beta_start 1e-4), from the formulas in issue 2 evaluated in
# float64. linear/1000/0.02 is the well-known DDPM value 4.0358e-05.
GOLDEN_ALPHA_BAR_T = {
    ("linear", 200, 0.08): 2.6569580690613076e-04,
    ("linear", 1000, 0.02): 4.0358297653756754e-05,
    ("cosine", 200, 0.08): 6.071799308549566e-08,
    ("cosine", 1000, 0.02): 2.4287669070348567e-09,
    ("quadratic", 200, 0.08): 3.4134456766126715e-03,
    ("quadratic", 1000, 0.02): 7.334124595808148e-04,
    ("sigmoid", 200, 0.08): 2.5078164703861035e-04,
    ("sigmoid", 1000, 0.02): 3.968181990533212e-05,
}


def reference_betas(name, T, b0, b1):
    """The same formulas in plain Python floats, written independently of the module."""
    if name == "linear":
        return [b0 + (b1 - b0) * i / (T - 1) for i in range(T)]
    if name == "quadratic":
        return [(math.sqrt(b0) + (math.sqrt(b1) - math.sqrt(b0)) * i / (T - 1)) ** 2 for i in range(T)]
    if name == "sigmoid":
        return [1 / (1 + math.exp(-(-6 + 12 * i / (T - 1)))) * (b1 - b0) + b0 for i in range(T)]
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return [min(1 - f(i + 1) / f(i), 0.999) for i in range(T)]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T,beta_end", STUDY)
def test_betas_valid_and_alpha_bar_decreasing(name, T, beta_end):
    s = make_schedule(name, T, 1e-4, beta_end)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (T,)
    assert bool(((s.betas > 0) & (s.betas < 1)).all())
    assert bool((s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all())
    assert s.alpha_bar_T == pytest.approx(GOLDEN_ALPHA_BAR_T[(name, T, beta_end)], rel=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T,beta_end", STUDY)
def test_betas_match_independent_formula(name, T, beta_end):
    ours = make_betas(name, T, 1e-4, beta_end).tolist()
    ref = reference_betas(name, T, 1e-4, beta_end)
    assert ours == pytest.approx(ref, rel=1e-10, abs=1e-15)
    assert math.prod(1 - b for b in ref) == pytest.approx(GOLDEN_ALPHA_BAR_T[(name, T, beta_end)], rel=1e-9)


def test_endpoints_of_beta_range():
    for name in ("linear", "quadratic"):
        b = make_betas(name, 200, 1e-4, 0.08)
        assert float(b[0]) == pytest.approx(1e-4) and float(b[-1]) == pytest.approx(0.08)


def test_cosine_ignores_beta_range():
    a = make_betas("cosine", 200, 1e-4, 0.08)
    b = make_betas("cosine", 200, 0.3, 0.5)
    assert torch.equal(a, b)
    assert float(a.max()) <= 0.999


def test_coefficients_consistent():
    s = make_schedule("linear", 100, 1e-4, 0.05)
    assert torch.allclose(
        s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, torch.ones(100, dtype=torch.float64)
    )
    assert float(s.posterior_variance[0]) == 0.0
    assert torch.allclose(s.log_snr, torch.log(s.alphas_cumprod / (1 - s.alphas_cumprod)))
    moved = s.to("cpu")
    assert moved.betas.dtype == torch.float32 and moved.alpha_bar_T == pytest.approx(s.alpha_bar_T, rel=1e-6)


@pytest.mark.parametrize(
    "args,match",
    [
        (("linear", 1, 1e-4, 0.02), "timesteps"),
        (("linear", 100, 0.0, 0.02), "beta_start"),
        (("linear", 100, 0.02, 0.02), "beta_start < beta_end"),
        (("quadratic", 100, 1e-4, 1.0), "< 1"),
        (("exponential", 100, 1e-4, 0.02), "unknown schedule"),
    ],
)
def test_bad_input_raises_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(*args)


def test_cosine_accepts_any_beta_range():
    make_schedule("cosine", 100, 0.0, 5.0)  # ignored, so not validated
