import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def bench_cache_dir(tmp_path_factory):
    """`sweep` caches this device's bench rates: tests keep theirs in a temporary folder, not the user's."""
    path = tmp_path_factory.mktemp("bench-cache")
    os.environ["MNIST_DIFF_BENCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def data_dir():
    """A torchvision root with MNIST. CI sets MNIST_DIFF_DATA_DIR (../shared/offline_assets.py); without
    it torchvision downloads MNIST into the default cache, as on a user's machine."""
    return os.environ.get("MNIST_DIFF_DATA_DIR")


@pytest.fixture(scope="session")
def mnist_small(data_dir):
    from mnist_diff.runtime.data import load_mnist
    return load_mnist(data_dir, train=True, limit=256)


@pytest.fixture(scope="session")
def fid_weights():
    return os.environ.get("MNIST_DIFF_FID_WEIGHTS")


# A config small enough to train in about a second per epoch on 2 CPU cores.
TINY = dict(schedule="linear", timesteps=20, beta_end=0.2, channels=8, batch_size=32, train_samples=128,
            warmup_steps=2, sampler="ddim", ddim_steps=5)


class RunsCode:
    """Pickles as a call of os.system: what a malicious checkpoint (say, uploaded to a tracking server) holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoint(path, marker):
    """A torch file shaped like a checkpoint whose loading with weights_only=False would create `marker`."""
    torch.save({"format_version": 1, "config": {}, "step": 1, "ema": RunsCode(marker)}, path)
    return path
