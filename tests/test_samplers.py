import pytest
import torch

from mnist_diff.diffusion.forward import extract
from mnist_diff.diffusion.samplers import (
    StackedRandomGenerator,
    ddim_sample,
    ddim_timesteps,
    ddpm_sample,
    image_seeds,
    sample,
)
from mnist_diff.diffusion.schedules import make_schedule
from mnist_diff.diffusion.unet import UNet
from mnist_diff.runtime.data import to_uint8
from mnist_diff.runtime.generate import generate


class Oracle(torch.nn.Module):
    """Knows the clean images: returns exactly the noise that separates x_t from sqrt(ab_t) x0."""

    def __init__(self, schedule, x0):
        super().__init__()
        self.s, self.x0 = schedule, x0

    def forward(self, x, t):
        ab = extract(self.s.alphas_cumprod, t, x.ndim)
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


def digits(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 28, 28, generator=gen) * 1.8 - 0.9).double()


@pytest.mark.parametrize("clip_x0", [True, False])
@pytest.mark.parametrize("T,steps", [(1000, 50), (1000, 37), (200, 200), (200, 3), (7, 2)])
def test_ddim_eta0_recovers_x0_with_oracle(T, steps, clip_x0):
    s = make_schedule("cosine", T).to("cpu", torch.float64)
    x0 = digits(4)
    rng = StackedRandomGenerator("cpu", image_seeds(0, 4))
    out = ddim_sample(Oracle(s, x0), s, rng, steps=steps, eta=0.0, clip_x0=clip_x0)
    assert torch.allclose(out.double(), x0, atol=1e-6)


def test_unclipped_ddim_recovers_x0_outside_the_data_range_and_clipped_does_not():
    s = make_schedule("cosine", 200).to("cpu", torch.float64)
    x0 = digits(3) * 1.5  # values up to 1.35: the oracle's x0 prediction leaves [-1, 1]
    rng = lambda: StackedRandomGenerator("cpu", image_seeds(2, 3))  # noqa: E731
    free = ddim_sample(Oracle(s, x0), s, rng(), steps=20, clip_x0=False)
    assert torch.allclose(free.double(), x0, atol=1e-6)
    clipped = ddim_sample(Oracle(s, x0), s, rng(), steps=20, clip_x0=True)
    assert clipped.abs().max() <= 1 and (clipped.double() - x0).abs().max() > 0.3


def test_ddim_intermediate_state_lies_on_the_forward_marginal():
    """With the oracle and eta=0, after the step to timestep s, x equals sqrt(ab_s) x0 + sqrt(1-ab_s) eps_T:
    which holds only if the update uses the alpha_bar of the timestep it actually moves to."""
    s = make_schedule("linear", 1000, 1e-4, 0.02).to("cpu", torch.float64)
    x0 = digits(2)
    seq = ddim_timesteps(1000, 37)  # spacing 27.75: not a "leading" grid
    seen = []

    class Spy(Oracle):
        def forward(self, x, t):
            seen.append((int(t[0]), x.clone()))
            return super().forward(x, t)

    rng = StackedRandomGenerator("cpu", image_seeds(3, 2))
    xT = StackedRandomGenerator("cpu", image_seeds(3, 2)).randn((1, 28, 28)).double()
    ddim_sample(Spy(s, x0), s, rng, steps=37)
    eps = (xT - s.alphas_cumprod[999].sqrt() * x0) / (1 - s.alphas_cumprod[999]).sqrt()
    assert [t for t, _ in seen] == seq
    for t_int, x in seen[1:]:
        ab = s.alphas_cumprod[t_int]
        assert torch.allclose(x.double(), ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-6)


@pytest.mark.parametrize("clip_x0", [True, False])
def test_ddpm_with_oracle_ends_at_x0(clip_x0):
    """At t=0 the posterior mean is exactly x0 (coef1 = 1, coef2 = 0) and no noise is added."""
    s = make_schedule("linear", 50, 1e-4, 0.2).to("cpu", torch.float64)
    x0 = digits(1)
    out = ddpm_sample(Oracle(s, x0), s, StackedRandomGenerator("cpu", [5]), clip_x0=clip_x0)
    assert torch.allclose(out.double(), x0, atol=1e-9)


class Overshoot(torch.nn.Module):
    """eps = -k x', x' = x with each row shifted by a pixel: the x0 prediction (x_t + k sqrt(1 - ab_t) x'_t) /
    sqrt(ab_t) leaves [-1, 1] for many pixels, and the shift lets a clipped pixel change its neighbours."""

    def __init__(self, k=0.5):
        super().__init__()
        self.k = k
        self.unused = torch.nn.Parameter(torch.zeros(1))  # so `generate` can find the device

    def forward(self, x, t):
        return -self.k * x.roll(1, dims=-1)


class NoiseFreeAfterXT(StackedRandomGenerator):
    """x_T as usual, then zero noise: DDPM follows its posterior means, which a test can recompute."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0

    def randn(self, size, dtype=torch.float32):
        self.calls += 1
        out = super().randn(size, dtype)
        return out if self.calls == 1 else torch.zeros_like(out)


def independent_ddpm(model, s, x, clip):
    """Ho et al. 2020 from scratch, no schedule buffers but betas: unclipped, the eq. (11) mean
    (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t); clipped, the eq. (7) posterior mean of the clipped x0."""
    betas = s.betas.double()
    alphas = 1 - betas
    ab = torch.cumprod(alphas, 0)
    for t in range(len(betas) - 1, -1, -1):
        eps = model(x, t)
        if not clip:
            x = (x - betas[t] / (1 - ab[t]).sqrt() * eps) / alphas[t].sqrt()
            continue
        x0 = ((x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()).clamp(-1, 1)
        ab_prev = ab[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        x = ab_prev.sqrt() * betas[t] / (1 - ab[t]) * x0 + alphas[t].sqrt() * (1 - ab_prev) / (1 - ab[t]) * x
    return x


def independent_ddim(model, s, x, steps, clip):
    """DDIM eq. (12) with eta = 0 from scratch: x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s) eps; clipped, eps is the
    one the clipped x0 implies; the last step returns x0."""
    ab = s.alphas_cumprod.double()
    seq = ddim_timesteps(s.timesteps, steps)
    for i, t in enumerate(seq):
        eps = model(x, t)
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - ab[t].sqrt() * x0) / (1 - ab[t]).sqrt()
        x = x0 if i == len(seq) - 1 else ab[seq[i + 1]].sqrt() * x0 + (1 - ab[seq[i + 1]]).sqrt() * eps
    return x


@pytest.mark.parametrize("clip_x0", [True, False])
def test_ddpm_matches_the_closed_form_means_clipped_or_not(clip_x0):
    s = make_schedule("linear", 20, 1e-4, 0.2).to("cpu", torch.float64)
    rng = NoiseFreeAfterXT("cpu", image_seeds(1, 3))
    xT = StackedRandomGenerator("cpu", image_seeds(1, 3)).randn((1, 28, 28)).double()
    out = ddpm_sample(Overshoot(), s, rng, clip_x0=clip_x0).double()
    assert torch.allclose(out, independent_ddpm(Overshoot(), s, xT, clip_x0), rtol=1e-5, atol=1e-6)
    other = ddpm_sample(Overshoot(), s, NoiseFreeAfterXT("cpu", image_seeds(1, 3)), clip_x0=not clip_x0).double()
    assert (out - other).abs().max() > 0.1  # the x0 predictions leave [-1, 1]: clipping matters
    assert (out.abs().max() <= 1 + 1e-6) == clip_x0  # the last step returns x0 itself


@pytest.mark.parametrize("clip_x0", [True, False])
def test_ddim_matches_the_closed_form_update_clipped_or_not(clip_x0):
    s = make_schedule("linear", 20, 1e-4, 0.2).to("cpu", torch.float64)
    rng = lambda: StackedRandomGenerator("cpu", image_seeds(4, 3))  # noqa: E731
    xT = rng().randn((1, 28, 28)).double()
    out = ddim_sample(Overshoot(), s, rng(), steps=7, clip_x0=clip_x0).double()
    assert torch.allclose(out, independent_ddim(Overshoot(), s, xT, 7, clip_x0), rtol=1e-5, atol=1e-6)
    other = ddim_sample(Overshoot(), s, rng(), steps=7, clip_x0=not clip_x0).double()
    assert (out - other).abs().max() > 0.1


def test_generate_passes_clip_x0_through():
    s = make_schedule("linear", 20, 1e-4, 0.2)
    model = Overshoot(0.1)  # mild: clipping changes the path, yet the unclipped images are not all saturated
    kwargs = dict(num=3, seed=4, sampler="ddim", ddim_steps=7, batch_size=3, progress=False)
    direct = ddim_sample(model, s, StackedRandomGenerator("cpu", image_seeds(4, 3)), steps=7, clip_x0=False)
    unclipped = generate(model, s, clip_x0=False, **kwargs)
    assert torch.equal(unclipped, to_uint8(direct))
    assert not torch.equal(unclipped, generate(model, s, **kwargs))  # clipping is on by default


def test_ddim_timesteps_spacing():
    assert ddim_timesteps(1000, 50)[0] == 999 and ddim_timesteps(1000, 50)[-1] == 0
    for T, k in [(1000, 50), (200, 200), (200, 199), (1000, 37), (10, 2)]:
        seq = ddim_timesteps(T, k)
        assert len(seq) == k and len(set(seq)) == k and seq == sorted(seq, reverse=True)
        assert seq[0] == T - 1 and seq[-1] == 0
    assert ddim_timesteps(200, 200) == list(range(199, -1, -1))


@pytest.mark.parametrize("steps", [0, 201, 1000])
def test_impossible_ddim_steps_raise(steps):
    with pytest.raises(ValueError):
        ddim_timesteps(200, steps)


def test_unknown_sampler_raises():
    s = make_schedule("linear", 10, 1e-4, 0.2)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(lambda x, t: x, s, StackedRandomGenerator("cpu", [0]), sampler="euler")


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_images_do_not_depend_on_batch_size(sampler, eta):
    torch.manual_seed(0)
    model = UNet(channels=8).eval()
    s = make_schedule("linear", 52, 1e-4, 0.2)  # > NOISE_BLOCK steps, so blocks of noise are crossed
    kwargs = dict(num=5, seed=3, sampler=sampler, ddim_steps=51, eta=eta, progress=False)
    one_batch = generate(model, s, batch_size=5, **kwargs)
    small_batches = generate(model, s, batch_size=3, **kwargs)  # a batch of 3, then one of 2
    assert torch.equal(one_batch, small_batches)
    # and the tail of a longer run is the same images: image i depends on (seed, i) only
    tail = generate(model, s, batch_size=4, **{**kwargs, "num": 2}, start=3)
    assert torch.equal(tail, one_batch[3:])
    other_seed = generate(model, s, batch_size=5, **{**kwargs, "seed": 4})
    assert not torch.equal(one_batch, other_seed)


def test_ddim_eta0_deterministic_given_xT_and_eta1_not():
    torch.manual_seed(0)
    model = UNet(channels=8).eval()
    s = make_schedule("linear", 40, 1e-4, 0.2).to("cpu")
    rng = lambda: StackedRandomGenerator("cpu", [11, 12])  # noqa: E731
    a = ddim_sample(model, s, rng(), steps=10, eta=0.0)
    b = ddim_sample(model, s, rng(), steps=10, eta=0.0)
    assert torch.equal(a, b)

    class SameXT(StackedRandomGenerator):  # same x_T, different later noise
        calls = 0

        def randn(self, size, dtype=torch.float32):
            SameXT.calls += 1
            out = super().randn(size, dtype)
            return out if SameXT.calls == 1 else out + 1.0

    c = ddim_sample(model, s, SameXT("cpu", [11, 12]), steps=10, eta=0.0)
    assert torch.equal(a, c)  # eta=0 uses no noise after x_T
    SameXT.calls = 0
    d1 = ddim_sample(model, s, rng(), steps=10, eta=1.0)
    d2 = ddim_sample(model, s, SameXT("cpu", [11, 12]), steps=10, eta=1.0)
    assert not torch.equal(d1, d2)


def test_batch_sizes_fold_a_small_tail_into_the_last_batch():
    from mnist_diff.runtime.generate import batch_sizes

    assert batch_sizes(2064, 2000) == [2064]  # a 64-image grid rides along with a 2,000-image FID set
    assert batch_sizes(72, 64) == [72]
    assert batch_sizes(73, 64) == [64, 9]  # more than an eighth: a batch of its own
    assert batch_sizes(10_000, 2000) == [2000] * 5
    assert batch_sizes(16, 64) == [16] and batch_sizes(0, 64) == []


def test_an_epochs_grid_and_fid_set_drawn_in_one_pass_are_the_images_drawn_apart(tmp_path):
    from mnist_diff.config import Config
    from mnist_diff.training.trainer import sample_epoch

    torch.manual_seed(0)
    model = UNet(channels=8).eval()
    config = Config(schedule="linear", timesteps=20, beta_end=0.2, channels=8, sampler="ddpm", ddim_steps=10)
    s = make_schedule(config.schedule, config.timesteps, config.beta_start, config.beta_end)
    seeds = image_seeds(config.seed, 9, 3)
    grid, drawn, seconds = sample_epoch(model, s, config, tmp_path / "together.png", seeds)
    assert torch.equal(drawn, generate(model, s, num=9, seed=config.seed, start=3, sampler="ddpm", progress=False))
    apart, _, _ = sample_epoch(model, s, config, tmp_path / "apart.png")
    assert grid.read_bytes() == apart.read_bytes() and seconds > 0
