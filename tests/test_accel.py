"""The fast path (mnist_diff.accel) on this CPU with the real inductor compiler: compiled sampling and training
compute what eager does, padding changes no image, and where compiling cannot work (no C++ compiler here)
a run goes on eagerly after one warning. Compiling costs tens of seconds on 2 cores: few compilations, one
batch shape each (inductor's on-disk cache makes reruns fast)."""
import warnings

import pytest
import torch
import torch._inductor.config as inductor_config

from conftest import TINY
from mnist_diff import accel
from mnist_diff.config import Config
from mnist_diff.generate import generate
from mnist_diff.model import UNet
from mnist_diff.schedules import make_schedule
from mnist_diff.train import Trainer

NO_COMPILER = {"cpp.cxx": (None, "/nonexistent/c++")}  # a machine without a C++ compiler: inductor can't work


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    """Each test starts as a fresh process would: no remembered compile failure."""
    monkeypatch.setattr(accel, "_failed", set())


def unet(seed):
    torch.manual_seed(seed)
    return UNet(channels=8).eval()


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


def test_compiled_sampling_gives_the_eager_images():
    """Tolerance: at most 1 grey level on any pixel (float rounding may flip a uint8 rounding); here they are
    in fact identical. Batch 4 over 6 images: the second batch is padded from 2 to 4 rows."""
    s = make_schedule("linear", 20, 1e-4, 0.2)
    a, b = unet(0), unet(1)
    for model in (a, b):  # b: the compiled twin must take the new weights, not keep a's
        for sampler, eta in (("ddpm", 0.0), ("ddim", 1.0)):
            kw = dict(num=6, seed=3, sampler=sampler, ddim_steps=5, eta=eta, batch_size=4, progress=False)
            eager = generate(model, s, compile="off", **kw)
            compiled = generate(model, s, compile="on", **kw)
            diff = (compiled.int() - eager.int()).abs()
            assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99, (sampler, diff.max())
            # padding rows change no image: images 4, 5 from a padded batch equal those from a full one
            full = generate(model, s, compile="on", **{**kw, "num": 4}, start=2)
            assert torch.equal(full[2:], compiled[4:])
    assert not accel._failed  # it really ran compiled
    assert not torch.equal(generate(a, s, compile="on", **kw), generate(b, s, compile="on", **kw))


def weights(trainer):
    return {**trainer.model.state_dict(), **{"ema." + k: v for k, v in trainer.ema.state_dict().items()}}


def test_compile_on_where_it_cannot_work_warns_once_per_kind_and_runs_exactly_eager(tmp_path, data_dir):
    """`train --compile on` on a machine without a C++ compiler: the first training step fails to compile and
    is rerun eagerly (random generator restored), the epoch's sample grid fails to compile and is drawn
    eagerly; one warning each, and the run ends with the weights and grid of a `--compile off` run, bit for bit.
    A fresh inductor cache and shapes no other test compiles make sure the compiler is really called."""
    from click.testing import CliRunner
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    import cli

    args = ["train", "--timesteps", "20", "--beta-end", "0.2", "--channels", "8", "--batch-size", "24",
            "--train-samples", "48", "--warmup-steps", "2", "--sampler", "ddim", "--ddim-steps", "5", "--epochs",
            "1", "--fid-every", "0", "--fid-samples", "0", "--no-tracking", "--quiet",
            *(["--data-dir", data_dir] if data_dir else [])]
    runs = {}
    for mode in ("off", "on"):
        with temporary_cache_dir(str(tmp_path / f"inductor-{mode}")), inductor_config.patch(NO_COMPILER), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = CliRunner().invoke(cli.cli, [*args, "--compile", mode, "--out", str(tmp_path / mode)])
        assert result.exit_code == 0, result.output
        runs[mode] = [str(w.message) for w in caught if issubclass(w.category, accel.CompileFallbackWarning)]
    assert runs["off"] == []
    assert len(runs["on"]) == 2 and "training" in runs["on"][0] and "sampling" in runs["on"][1], runs["on"]
    assert "C++ compiler" in runs["on"][0]
    ckpt = {m: torch.load(next((tmp_path / m / "checkpoints").glob("ckpt-*.pt")), weights_only=False)
            for m in runs}
    for part in ("model", "ema"):
        a, b = ckpt["off"][part], ckpt["on"][part]
        assert all(torch.equal(a[k], b[k]) for k in a), part
    grid = lambda m: (tmp_path / m / "samples" / "epoch-001.png").read_bytes()  # noqa: E731
    assert grid("on") == grid("off")


def test_compiled_training_resumes_exactly_and_follows_eager(tmp_path, mnist_small):
    """max_steps inside the first epoch: no epoch end, so no grid is sampled and only the training step is
    compiled (batch 32, forward and backward)."""
    images = mnist_small[:256]  # 8 steps per epoch
    config = Config(**{**TINY, "compile": "on", "max_steps": 5})
    straight = Trainer(config, images, tmp_path / "a", progress=False)
    straight.fit()
    Trainer(config.replace(max_steps=2), images, tmp_path / "b", progress=False).fit()
    resumed = Trainer(config, images, tmp_path / "b", progress=False)
    assert resumed.resume() and resumed.step == 2
    resumed.fit()
    assert not accel._failed
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.epoch_loss[1] == resumed.epoch_loss[1] == 5
    assert straight.epoch_loss[0] == pytest.approx(resumed.epoch_loss[0], rel=1e-6)  # float32 window means
    eager = Trainer(config.replace(compile="off"), images, tmp_path / "c", progress=False)
    eager.fit()
    assert eager.epoch_loss[0] == pytest.approx(straight.epoch_loss[0], rel=1e-4)  # mean losses of 5 steps
