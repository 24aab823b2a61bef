"""FID with the real torch-fidelity and the real Inception weights (MNIST_DIFF_FID_WEIGHTS)."""
import shutil

import pytest
import torch

from mnist_diff.data import load_mnist
from mnist_diff.evaluate import Reference, compute_fid, weights_fingerprint

N = 16


@pytest.fixture(scope="module")
def ref(data_dir, fid_weights):
    return Reference("train", N, data_dir, fid_weights)


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


def test_cache_key_holds_split_count_and_weights_content(ref, data_dir, fid_weights, tmp_path):
    names = {ref.cache_name(), Reference("test", N, data_dir, fid_weights).cache_name(),
             Reference("train", N + 1, data_dir, fid_weights).cache_name(),
             Reference("train", None, data_dir, fid_weights).cache_name()}
    assert len(names) == 4
    # the same bytes under another path share the entry; a different file never does
    copy = tmp_path / "copy.pth"
    shutil.copyfile(fid_weights, copy)
    assert weights_fingerprint(copy) == weights_fingerprint(fid_weights)
    fp16 = tmp_path / "fp16.pth"
    sd = torch.load(fid_weights, map_location="cpu")
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, fp16)
    assert weights_fingerprint(fp16) != weights_fingerprint(fid_weights)
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
