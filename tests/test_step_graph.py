"""The whole training step as one CUDA graph (mnist_diff.step_graph). Without a GPU the graph itself cannot run,
so `RerunCapture` stands in for it: a "replay" runs the step again, while everything around the graph runs for
real (the snapshot and its restores, the check against eager steps, the static batch, the learning rate and EMA
weight written before each replay). On a machine with a GPU the same tests also capture real CUDA graphs."""

import warnings

import pytest
import torch
from conftest import TINY

from mnist_diff.config import Config
from mnist_diff.runtime import accel
from mnist_diff.runtime.accel import CompileFallbackWarning
from mnist_diff.runtime.step_graph import RerunCapture, StepGraph, update_error
from mnist_diff.training.trainer import Trainer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# warm-ups of the EMA and the learning rate inside the 5 steps: the scalars change at every step
CONFIG = Config(**{**TINY, "max_steps": 5, "ema_warmup_steps": 4, "warmup_steps": 3, "compile": "off"})


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    """Each test starts as a fresh process would: no remembered fallback."""
    monkeypatch.setattr(accel, "_failed", set())


class FrozenNoise(RerunCapture):
    """A graph that would replay the noise it drew at capture: the failure `register_generator_state` avoids."""

    def __init__(self, generator):
        self.generator = generator

    def capture(self, body):
        state = self.generator.get_state()

        def replay():
            self.generator.set_state(state)
            return body()

        return replay


def state(trainer) -> dict:
    opt = trainer.optimizer.state_dict()["state"]
    return {
        **{f"model.{k}": v for k, v in trainer.model.state_dict().items()},
        **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()},
        **{f"adam.{i}.{k}": v for i, s in opt.items() for k, v in s.items()},
        "noise": trainer.noise_gen.get_state(),
    }


def trainer(images, out, config=CONFIG, capture="rerun"):
    t = Trainer(config, images, out, progress=False)
    if capture is not None:
        cap = {"rerun": RerunCapture(), "frozen": FrozenNoise(t.noise_gen), "cuda": None}[capture]
        t.step_graph = StepGraph(t, model=t.model, capture=cap)
    return t


def fit(t):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit()
    return [str(w.message) for w in caught if issubclass(w.category, CompileFallbackWarning)]


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k].cpu(), b[k].cpu())]
    assert not different, different


def test_replayed_steps_are_the_eager_steps_bit_for_bit(tmp_path, mnist_small):
    eager = trainer(mnist_small, tmp_path / "eager", capture=None)
    graph = trainer(mnist_small, tmp_path / "graph")
    assert fit(eager) == fit(graph) == []
    assert graph.step_graph.replay is not None and not accel.fell_back()  # it was used, not fallen back
    assert graph.step == eager.step == 5
    assert_same(state(eager), state(graph))
    assert eager.epoch_loss == graph.epoch_loss
    # the checkpoint is the eager one's: a float learning rate, not capturable, so it resumes on any device
    ckpt = torch.load(next((tmp_path / "graph" / "checkpoints").glob("ckpt-*.pt")), weights_only=False)
    assert all(type(g["lr"]) is float and g["capturable"] is False for g in ckpt["optimizer"]["param_groups"])


def test_a_graph_built_after_a_resume_continues_exactly(tmp_path, mnist_small):
    """The snapshot of a resumed run holds AdamW's state (a fresh run has none yet): warm-up, capture and check
    must leave it as loaded."""
    straight = trainer(mnist_small, tmp_path / "straight", capture=None)
    fit(straight)
    fit(trainer(mnist_small, tmp_path / "b", config=CONFIG.replace(max_steps=2)))
    resumed = trainer(mnist_small, tmp_path / "b")
    assert resumed.resume() and resumed.step == 2 and resumed.optimizer.state
    assert fit(resumed) == []
    assert_same(state(straight), state(resumed))


@pytest.mark.parametrize(
    "capture,why",
    [
        ("frozen", "replay 2 strays from the eager step"),  # a graph that replays the same noise is refused
        pytest.param(
            "cuda",
            "CUDA-graph capture failed",  # where CUDA graphs cannot work at all
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA graphs work here"),
        ),
    ],
)
def test_a_graph_that_fails_or_strays_gives_one_warning_and_the_eager_result(tmp_path, mnist_small, capture, why):
    eager = trainer(mnist_small, tmp_path / "eager", capture=None)
    fallen = trainer(mnist_small, tmp_path / capture, capture=capture)
    fit(eager)
    caught = fit(fallen)
    assert len(caught) == 1 and why in caught[0] and "training-graph" in caught[0], caught
    assert accel.fell_back() == ["training-graph"] and fallen.step_graph.replay is None
    assert_same(state(eager), state(fallen))  # the check's steps were undone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_cuda_the_captured_step_follows_the_eager_step(tmp_path, mnist_small):
    """The real thing: compiled model, fused AdamW, bf16, one CUDA graph per step. Weights within what 5 AdamW
    steps of lr <= 2e-4 can move them (cuDNN's atomic adds make eager runs differ as much)."""
    images = mnist_small.cuda()
    config = CONFIG.replace(compile="on")
    eager = trainer(images, tmp_path / "eager", config=config.replace(compile="off"), capture=None)
    graph = Trainer(config, images, tmp_path / "graph", progress=False)
    assert graph.step_graph is not None
    fit(eager)
    assert fit(graph) == [] and graph.step_graph.replay is not None
    a, b = state(eager), state(graph)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=2e-3) for k in a if k.startswith(("model", "ema")))
    assert eager.epoch_loss[0] == pytest.approx(graph.epoch_loss[0], rel=2e-2)


def test_update_error_measures_the_stray_relative_to_the_update():
    start = [torch.zeros(3), torch.zeros(2)]
    reference = [torch.tensor([3.0, 0, 0]), torch.tensor([0.0, 4])]  # moved by 5
    got = [torch.tensor([3.0, 0, 0]), torch.tensor([0.0, 4.5])]  # 0.5 away
    assert update_error(start, reference, got) == pytest.approx(0.1)
    assert update_error(start, reference, reference) == 0.0
