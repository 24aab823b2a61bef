"""The fast path (mnist_diff.accel) with the real inductor compiler: compiled sampling and training compute
what eager does, padding changes no image, and where compiling cannot work (no C++ compiler here) a run goes
on eagerly after one warning. Compiling costs tens of seconds on 2 cores: few compilations, one batch shape
each (inductor's on-disk cache makes reruns fast). On a machine with a GPU the device tests also run on CUDA
(CUDA graphs, bf16), with tolerances for its other kernels: `pytest tests/test_accel.py` is the GPU check."""

import warnings

import pytest
import torch
import torch._inductor.config as inductor_config
from conftest import TINY

from mnist_diff.config import Config
from mnist_diff.diffusion.schedules import make_schedule
from mnist_diff.diffusion.unet import UNet
from mnist_diff.runtime import accel
from mnist_diff.runtime.device import effective_precision
from mnist_diff.runtime.generate import generate
from mnist_diff.training.trainer import Trainer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

NO_COMPILER = {"cpp.cxx": (None, "/nonexistent/c++")}  # a machine without a C++ compiler: inductor can't work


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    """Each test starts as a fresh process would: no remembered compile failure."""
    monkeypatch.setattr(accel, "_failed", set())


def unet(seed, device="cpu"):
    torch.manual_seed(seed)
    return UNet(channels=8).eval().to(device)


def test_compile_auto_is_on_for_cuda_only_and_config_keeps_it_out_of_the_training_key():
    assert accel.compile_enabled("auto", "cuda") and not accel.compile_enabled("auto", "cpu")
    assert accel.compile_enabled("on", "cpu") and not accel.compile_enabled("off", "cuda")
    base = Config(**TINY)
    assert base.training_key() == base.replace(compile="on", sample_batch_size=7).training_key()
    with pytest.raises(ValueError, match="--compile"):
        Config(**TINY, compile="yes")
    assert accel.default_sample_batch_size("cpu") == accel.CPU_SAMPLE_BATCH


def test_bucket_pads_partial_batches_to_few_shapes():
    assert [accel._bucket(n, 2000) for n in (2000, 1999, 1000, 64, 63, 3)] == [2000, 2000, 1024, 64, 64, 16]
    assert accel._bucket(5, 4) == 5 and accel._bucket(3, 4) == 4


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_sampling_gives_the_eager_images(device):
    """Tolerance on the uint8 images: in fp32 (a CPU without bf16), at most 1 grey level on any pixel and 99%
    identical (float rounding may flip a uint8 rounding; in fact they are identical); in bf16 (autocast where
    native: GPUs, CPUs with bf16 instructions; other kernels), 95% of pixels within 2 levels. Batch 4 over 6
    images: the second batch is padded from 2 to 4 rows."""
    from torch._dynamo.utils import counters

    s = make_schedule("linear", 20, 1e-4, 0.2)
    a, b = unet(0, device), unet(1, device)
    skips = counters["inductor"]["cudagraph_skips"]
    for model in (a, b):  # b: the compiled twin must take the new weights, not keep a's
        for sampler, eta in (("ddpm", 0.0), ("ddim", 1.0)):
            kw = dict(num=6, seed=3, sampler=sampler, ddim_steps=5, eta=eta, batch_size=4, progress=False)
            eager = generate(model, s, compile="off", **kw)
            compiled = generate(model, s, compile="on", **kw)
            diff = (compiled.int() - eager.int()).abs()
            if effective_precision(device, "auto") == "fp32":
                assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99, (sampler, diff.max())
            else:
                assert (diff <= 2).float().mean() > 0.95, (sampler, diff.float().mean())
            # padding rows change no image: images 4, 5 from a padded batch equal those from a full one
            # (the same compiled shape: on CUDA too up to the rounding of row-dependent kernels, if any)
            full = generate(model, s, compile="on", **{**kw, "num": 4}, start=2)
            assert (full[2:].int() - compiled[4:].int()).abs().max() <= (0 if device == "cpu" else 1)
    assert not accel.fell_back()  # it really ran compiled
    assert counters["inductor"]["cudagraph_skips"] == skips  # and, on CUDA, as CUDA graphs
    assert not torch.equal(generate(a, s, compile="on", **kw), generate(b, s, compile="on", **kw))


def weights(trainer):
    return {**trainer.model.state_dict(), **{"ema." + k: v for k, v in trainer.ema.state_dict().items()}}


def test_compile_on_where_it_cannot_work_warns_once_per_kind_and_runs_exactly_eager(tmp_path, data_dir):
    """`train --compile on` on a machine without a C++ compiler: the first training step fails to compile and
    is rerun eagerly (random generator restored), the epoch's sample sheet fails to compile and is drawn
    eagerly; one warning each, and the run ends with the weights and grid of a `--compile off` run, bit for bit.
    A fresh inductor cache and shapes no other test compiles make sure the compiler is really called."""
    from click.testing import CliRunner
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    import cli

    args = [
        "train",
        "--timesteps",
        "20",
        "--beta-end",
        "0.2",
        "--channels",
        "8",
        "--batch-size",
        "24",
        "--train-samples",
        "48",
        "--warmup-steps",
        "2",
        "--sampler",
        "ddim",
        "--ddim-steps",
        "5",
        "--epochs",
        "1",
        "--fid-every",
        "0",
        "--fid-samples",
        "0",
        "--no-tracking",
        "--quiet",
        "--device",
        "cpu",
        *(["--data-dir", data_dir] if data_dir else []),
    ]
    runs = {}
    for mode in ("off", "on"):
        with (
            temporary_cache_dir(str(tmp_path / f"inductor-{mode}")),
            inductor_config.patch(NO_COMPILER),
            warnings.catch_warnings(record=True) as caught,
        ):
            warnings.simplefilter("always")
            result = CliRunner().invoke(cli.cli, [*args, "--compile", mode, "--out", str(tmp_path / mode)])
        assert result.exit_code == 0, result.output
        runs[mode] = [str(w.message) for w in caught if issubclass(w.category, accel.CompileFallbackWarning)]
    assert runs["off"] == []
    assert len(runs["on"]) == 2 and "training" in runs["on"][0] and "sampling" in runs["on"][1], runs["on"]
    assert "C++ compiler" in runs["on"][0]
    ckpt = {m: torch.load(next((tmp_path / m / "checkpoints").glob("ckpt-*.pt")), weights_only=False) for m in runs}
    for part in ("model", "ema"):
        a, b = ckpt["off"][part], ckpt["on"][part]
        assert all(torch.equal(a[k], b[k]) for k in a), part
    grid = lambda m: (tmp_path / m / "samples" / "epoch-001.png").read_bytes()  # noqa: E731
    assert grid("on") == grid("off")


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_resumes_exactly_and_follows_eager(tmp_path, mnist_small, device):
    """max_steps inside the first epoch: no epoch end, so no grid is sampled and only the training step is
    compiled (batch 32, forward and backward). On CUDA (CUDA graphs, bf16, cuDNN's atomic adds) "exactly"
    becomes: weights within what 5 AdamW steps of lr <= 2e-4 can move them, losses within 1e-3."""
    from torch._dynamo.utils import counters

    images = mnist_small[:256].to(device)  # 8 steps per epoch
    # fp32 on a CPU: this tests compiling, and inductor takes twice as long over bf16 CPU code
    config = Config(**{**TINY, "compile": "on", "max_steps": 5, "precision": "fp32" if device == "cpu" else "auto"})
    skips = counters["inductor"]["cudagraph_skips"]
    straight = Trainer(config, images, tmp_path / "a", progress=False)
    straight.fit()
    Trainer(config.replace(max_steps=2), images, tmp_path / "b", progress=False).fit()
    resumed = Trainer(config, images, tmp_path / "b", progress=False)
    assert resumed.resume() and resumed.step == 2
    resumed.fit()
    assert not accel.fell_back() and counters["inductor"]["cudagraph_skips"] == skips
    a, b = weights(straight), weights(resumed)
    if device == "cpu":
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert all(torch.allclose(a[k], b[k], rtol=0, atol=2e-3) for k in a)
    assert straight.epoch_loss[1] == resumed.epoch_loss[1] == 5
    tol = 1e-6 if device == "cpu" else 1e-3  # CPU: float32 means of other windows
    assert straight.epoch_loss[0] == pytest.approx(resumed.epoch_loss[0], rel=tol)
    eager = Trainer(config.replace(compile="off"), images, tmp_path / "c", progress=False)
    eager.fit()
    tol = 1e-4 if device == "cpu" else 2e-2  # CUDA: bf16 autocast, other kernels
    assert eager.epoch_loss[0] == pytest.approx(straight.epoch_loss[0], rel=tol)  # mean losses of 5 steps
