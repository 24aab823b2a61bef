"""FID with the real torch-fidelity and the real Inception weights: MNIST_DIFF_FID_WEIGHTS, or, where it is unset
(a user's machine), the weights torch-fidelity downloads itself."""
import os
import shutil
from urllib.parse import urlparse

import pytest
import torch

from mnist_diff.data import load_mnist
from mnist_diff.evaluate import Reference, compute_fid, weights_fingerprint

N = 16


@pytest.fixture(scope="module")
def ref(data_dir, fid_weights):
    return Reference("train", N, data_dir, fid_weights)


@pytest.fixture(scope="module")
def weights_file(fid_weights) -> str:
    """The Inception weights as a file: MNIST_DIFF_FID_WEIGHTS, else the file torch-fidelity downloads into the
    torch hub cache (fetched here the way torch-fidelity fetches it, so only once)."""
    if fid_weights:
        return fid_weights
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu")
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(URL_INCEPTION_V3).path))


def test_identical_sets_give_zero_and_batch_size_does_not_matter(ref, data_dir, tmp_path):
    same = load_mnist(data_dir, train=True, limit=N)
    a = compute_fid(same, ref, batch_size=16, cache_dir=tmp_path)
    b = compute_fid(same, ref, batch_size=5, cache_dir=tmp_path)
    assert abs(a["fid"]) < 1e-2
    assert a["fid"] == pytest.approx(b["fid"], abs=1e-3)


def test_digits_vs_noise_is_large_and_other_digits_in_between(ref, data_dir, tmp_path):
    noise = torch.randint(0, 256, (N, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    other_digits = load_mnist(data_dir, train=False, limit=N)
    fid_noise = compute_fid(noise, ref, cache_dir=tmp_path)["fid"]
    fid_digits = compute_fid(other_digits, ref, cache_dir=tmp_path)["fid"]
    assert fid_noise > 200
    assert 1 < fid_digits < fid_noise / 2


def test_cache_key_holds_split_count_and_weights_content(ref, data_dir, fid_weights, weights_file, tmp_path):
    names = {ref.cache_name(), Reference("test", N, data_dir, fid_weights).cache_name(),
             Reference("train", N + 1, data_dir, fid_weights).cache_name(),
             Reference("train", None, data_dir, fid_weights).cache_name()}
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


def test_changed_split_is_recomputed_not_reused(ref, data_dir, fid_weights, tmp_path):
    images = load_mnist(data_dir, train=True, limit=N)
    on_train = compute_fid(images, ref, cache_dir=tmp_path)["fid"]
    on_test = compute_fid(images, Reference("test", N, data_dir, fid_weights), cache_dir=tmp_path)["fid"]
    assert abs(on_train) < 1e-2 and on_test > 1  # a reused train entry would give ~0 again
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith("mnist-train-16-") for n in cached) and any(n.startswith("mnist-test-16-") for n in cached)


def test_rejects_wrong_image_layout(ref):
    with pytest.raises(ValueError):
        compute_fid(torch.zeros(4, 1, 28, 28), ref)  # float, not uint8
