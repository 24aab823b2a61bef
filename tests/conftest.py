import os

import pytest
import torch

from mnist_diff.presets import SMOKE

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


# Every test's config starts here: the smoke preset's model (width 8, batch 32) on a short diffusion (T=20) and
# 128 images, an epoch in about a second on 2 CPU cores. Tests change what they need; commands take it as
# options through `cli_args`.
TINY = dict(
    schedule="linear",
    timesteps=20,
    beta_end=0.2,
    channels=SMOKE["channels"],
    batch_size=SMOKE["batch_size"],
    train_samples=128,
    warmup_steps=2,
    sampler="ddim",
    ddim_steps=5,
)


def cli_args(**fields) -> list[str]:
    """Config fields as command-line options: `--name value`; a boolean as `--name` or `--no-name`."""
    args = []
    for name, value in fields.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def tiny_args(*fields: str, **changes) -> list[str]:
    """TINY's `fields` (all of them by default) with `changes`, as options."""
    return cli_args(**{**{k: TINY[k] for k in (fields or TINY)}, **changes})


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
