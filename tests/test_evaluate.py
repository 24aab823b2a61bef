"""FID with the real torch-fidelity and the real Inception weights: MNIST_DIFF_FID_WEIGHTS, or, where it is unset
(a user's machine), the weights torch-fidelity downloads itself."""

import builtins
import os
import shutil
import warnings
from urllib.parse import urlparse

import numpy as np
import pytest
import scipy.linalg
import torch

from mnist_diff.fid.engine import (
    Reference,
    compute_fid,
    ensure_reference_stats,
    frechet_distance,
    trace_sqrt_product,
    weights_fingerprint,
)
from mnist_diff.runtime.data import load_mnist, to_fid_rgb

N = 16


@pytest.fixture(scope="module")
def ref(data_dir, fid_weights):
    return Reference("train", N, data_dir, fid_weights)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the tests that don't look into it: the reference is extracted once per module."""
    return tmp_path_factory.mktemp("fid-cache")


def noise_images(n=N, seed=0):
    return torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# -- the Fréchet distance's math -------------------------------------------------------------------------


def test_trace_term_matches_closed_form_of_commuting_covariances():
    # features ±c_i e_i (i < k) have mean 0 and covariance diag(2 r c_i² / (n-1)) on k of d axes (r
    # repeats): with a diagonal S1, tr sqrt(S1 S2) = Σ sqrt(s1_i · 2 r c_i² / (n-1)), exactly
    d, k = 10, 3
    c = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64)
    rows = torch.zeros(2 * k, d, dtype=torch.float64)
    rows[torch.arange(k), torch.arange(k)] = c
    rows[k + torch.arange(k), torch.arange(k)] = -c
    s1 = torch.linspace(0.1, 2.0, d, dtype=torch.float64)
    for reps in (1, 3):  # n = 6 < d (the n×n path) and n = 18 >= d (the d×d path)
        features, n = rows.repeat(reps, 1), 2 * k * reps
        expected = (s1[:k] * 2 * reps * c**2 / (n - 1)).sqrt().sum()
        assert float(trace_sqrt_product(torch.diag(s1), features)) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("m, n", [(40, 5), (40, 15), (4, 5), (4, 15)])  # reference full rank or not; n < d, n >= d
def test_frechet_distance_equals_sqrtm_and_torch_fidelity(m, n):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    rng = np.random.default_rng(m * 100 + n)
    d = 8
    f1 = rng.normal(size=(m, d)) * rng.uniform(0.5, 2, size=d)
    f2 = rng.normal(size=(n, d)) * 1.5 + 0.3
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm warns about the singular products of the rank-deficient cases
        direct = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    sigma1 = torch.tensor(s1)
    assert float(trace_sqrt_product(sigma1, torch.tensor(f2))) == pytest.approx(direct, abs=1e-6)
    theirs = fid_statistics_to_metric({"mu": f1.mean(0), "sigma": s1}, {"mu": f2.mean(0), "sigma": s2}, False)
    ours = frechet_distance(torch.tensor(f1.mean(0)), sigma1, torch.tensor(f2))
    assert ours == pytest.approx(theirs[KEY_METRIC_FID], abs=1e-6)
    assert 0 < ours


# -- FID of real images ----------------------------------------------------------------------------------


class _Images(torch.utils.data.Dataset):
    """uint8 3xHxW items: how torch-fidelity's calculate_metrics takes images."""

    def __init__(self, images_u8):
        self.images = to_fid_rgb(images_u8)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]


def test_equals_torch_fidelity_calculate_metrics(ref, data_dir, fid_weights, cache):
    import torch_fidelity
    from torch_fidelity.metric_fid import fid_features_to_statistics

    noise, digits = noise_images(8), load_mnist(data_dir, train=False, limit=8)  # n = 8 < 2048 features
    ours_noise = compute_fid(noise, ref, kid=True, cache_dir=cache)
    ours_digits = compute_fid(digits, ref, cache_dir=cache)
    # torch-fidelity reads the reference entries written above (same names and format) and extracts the
    # generated sets' features through its DataLoader
    common = dict(
        input2=_Images(ref.images()),
        input2_cache_name=ref.cache_name(),
        cache_root=str(cache),
        fid=True,
        cuda=False,
        batch_size=8,
        feature_extractor_weights_path=fid_weights,
        verbose=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This DataLoader will create")
        theirs_noise = torch_fidelity.calculate_metrics(input1=_Images(noise), kid=True, kid_subset_size=8, **common)
        theirs_digits = torch_fidelity.calculate_metrics(input1=_Images(digits), **common)
    assert ours_noise["fid"] == pytest.approx(theirs_noise["frechet_inception_distance"], abs=1e-3)
    assert ours_digits["fid"] == pytest.approx(theirs_digits["frechet_inception_distance"], abs=1e-3)
    assert ours_noise["kid"] == pytest.approx(theirs_noise["kernel_inception_distance_mean"], abs=1e-6)
    assert ours_noise["kid_std"] == pytest.approx(theirs_noise["kernel_inception_distance_std"], abs=1e-6)
    # the reference entry holds torch-fidelity's statistics of the reference features, in its dtypes
    prefix = cache / f"{ref.cache_name()}-inception-v3-compat-"
    stat = torch.load(f"{prefix}stat-fid-2048.pt", weights_only=False)
    expected = fid_features_to_statistics(torch.load(f"{prefix}features-2048.pt"))
    for k in ("mu", "sigma"):
        assert stat[k].dtype == expected[k].dtype and stat[k].shape == expected[k].shape
        np.testing.assert_allclose(stat[k], expected[k], rtol=0, atol=1e-6)
    # and the scores order as they should: noise far, other digits in between
    assert ours_noise["fid"] > 200
    assert 1 < ours_digits["fid"] < ours_noise["fid"] / 2


def test_identical_sets_give_zero_and_batch_size_does_not_matter(ref, data_dir, cache):
    same = load_mnist(data_dir, train=True, limit=N)
    assert abs(compute_fid(same, ref, cache_dir=cache)["fid"]) < 1e-2
    a = compute_fid(same[:6], ref, batch_size=6, cache_dir=cache)
    b = compute_fid(same[:6], ref, batch_size=4, cache_dir=cache)
    assert a["fid"] == pytest.approx(b["fid"], abs=1e-3)


def test_after_the_first_score_nothing_is_loaded_from_disk(data_dir, fid_weights, tmp_path, monkeypatch):
    small = Reference("train", 4, data_dir, fid_weights)
    ensure_reference_stats(small, device="cpu", cache_dir=tmp_path)
    assert any(p.name.endswith("-stat-fid-2048.pt") for p in tmp_path.iterdir())
    loads = []

    def counting(fn):
        def wrapper(*args, **kwargs):
            loads.append((fn.__name__, args[:1]))
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(torch, "load", counting(torch.load))
    monkeypatch.setattr(builtins, "open", counting(builtins.open))
    monkeypatch.setattr(np, "load", counting(np.load))
    first = compute_fid(noise_images(2), small, cache_dir=tmp_path)
    second = compute_fid(noise_images(2), small, cache_dir=tmp_path)
    assert loads == []  # no weights, no statistics, no MNIST: the engine and the reference stay in memory
    assert first["fid"] == second["fid"] > 0
    torch.save(torch.zeros(1), tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt")
    open(tmp_path / "probe.pt", "rb").close()
    assert {"load", "open"} <= {name for name, _ in loads}  # the instrumentation does see loads


@pytest.fixture(scope="module")
def weights_file(fid_weights) -> str:
    """The Inception weights as a file: MNIST_DIFF_FID_WEIGHTS, else the file torch-fidelity downloads into the
    torch hub cache (fetched here the way torch-fidelity fetches it, so only once)."""
    if fid_weights:
        return fid_weights
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu")
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(URL_INCEPTION_V3).path))


def test_cache_key_holds_split_count_and_weights_content(ref, data_dir, fid_weights, weights_file, tmp_path):
    names = {
        ref.cache_name(),
        Reference("test", N, data_dir, fid_weights).cache_name(),
        Reference("train", N + 1, data_dir, fid_weights).cache_name(),
        Reference("train", None, data_dir, fid_weights).cache_name(),
    }
    assert len(names) == 4
    # the same bytes under another path share the entry; a different file never does
    copy = tmp_path / "copy.pth"
    shutil.copyfile(weights_file, copy)
    assert weights_fingerprint(copy) == weights_fingerprint(weights_file)
    fp16 = tmp_path / "fp16.pth"
    sd = torch.load(weights_file, map_location="cpu")
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, fp16)
    assert weights_fingerprint(fp16) != weights_fingerprint(weights_file)
    assert Reference("train", N, data_dir, str(fp16)).cache_name() != ref.cache_name()


def test_changed_split_is_recomputed_not_reused(data_dir, fid_weights, tmp_path):
    images = load_mnist(data_dir, train=True, limit=6)
    on_train = compute_fid(images, Reference("train", 6, data_dir, fid_weights), cache_dir=tmp_path)["fid"]
    on_test = compute_fid(images, Reference("test", 6, data_dir, fid_weights), cache_dir=tmp_path)["fid"]
    assert abs(on_train) < 1e-2 and on_test > 1  # a reused train entry would give ~0 again
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith("mnist-train-6-") for n in cached) and any(n.startswith("mnist-test-6-") for n in cached)


def test_rejects_wrong_image_layout(ref):
    with pytest.raises(ValueError):
        compute_fid(torch.zeros(4, 1, 28, 28), ref)  # float, not uint8
    with pytest.raises(ValueError):
        compute_fid(torch.zeros(4, 2, 28, 28, dtype=torch.uint8), ref)  # neither gray nor RGB
