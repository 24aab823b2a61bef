"""The UNet's fused forward (docs/speed.md#the-fused-forward) computes what the eager one does, on the same
parameters: tight in fp32, within bf16's rounding under autocast, for its gradients too; the `fused` setting
parses, resolves and falls back to the eager forward with one warning where it cannot run. Random weights
everywhere (the layers that start at zero too, and the norms' affine), so that a wrong fused piece shows."""

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from conftest import TINY, tiny_args
from torch.nn.attention import SDPBackend, sdpa_kernel

import cli
from mnist_diff.config import RUNTIME_FIELDS, Config
from mnist_diff.diffusion.unet import UNet, group_norm_act, padded_conv
from mnist_diff.runtime import accel
from mnist_diff.training.trainer import build_model


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    """Each test starts as a fresh process would: no remembered fallback."""
    monkeypatch.setattr(accel, "_failed", set())


def randomized(model: UNet, seed: int = 0) -> UNet:
    """Every layer random: the zero-initialised ones (each block's conv2, attention's out) and the norms too."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            m.reset_parameters()
        elif isinstance(m, nn.GroupNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, std=0.2)
    return model


def pair(channels: int, seed: int = 0) -> tuple[UNet, UNet]:
    eager = randomized(UNet(channels=channels), seed)
    fused = copy.deepcopy(eager)
    fused.fused = True
    return eager, fused


def inputs(batch: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("channels,batch", [(8, 1), (16, 3), (24, 2)])
def test_fused_forward_equals_eager_in_fp32(channels, batch):
    eager, fused = pair(channels, seed=channels)
    x, t = inputs(batch, seed=batch)
    with torch.no_grad():
        a, b = eager(x, t), fused(x, t)
    assert b.shape == a.shape == x.shape and b.dtype == torch.float32
    assert a.abs().max() > 0.1  # a real output, not the zero of untrained last layers
    assert max_diff(a, b) <= 1e-5 * a.abs().max().item()  # fp32 rounding of reordered sums (measured ~2e-6)


@pytest.mark.parametrize("channels", [8, 16])
def test_fused_forward_under_bf16_autocast_is_as_close_to_fp32_as_eager(channels):
    """bf16 keeps 8 significant bits (relative rounding ~0.4%), and its rounding compounds over the UNet's ~25
    layers: the two bf16 forwards differ by about 1-2% of the output's scale (measured at widths 8-24), since
    they round at different points (the fused one adds the time embedding and normalises in fp32). So: within
    5% of the output's scale of each other, and the fused one no further from the fp32 answer than eager's
    error allows (2x, as both errors are rounding noise)."""
    eager, fused = pair(channels, seed=channels)
    x, t = inputs(4)
    with torch.no_grad():
        reference = eager(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = eager(x, t), fused(x, t)
    scale = reference.abs().max().item()
    assert b.dtype == a.dtype == torch.bfloat16
    assert max_diff(a, b) <= 0.05 * scale
    assert max_diff(b, reference) <= 2 * max_diff(a, reference) + 1e-3 * scale


def test_fused_is_no_state_and_checkpoints_are_interchangeable():
    eager, fused = pair(8)
    assert list(fused.state_dict()) == list(eager.state_dict()) == list(UNet(channels=8).state_dict())
    loaded = UNet(channels=8, fused=True)
    loaded.load_state_dict(eager.state_dict())  # strict: same names and shapes
    x, t = inputs(2)
    with torch.no_grad():
        assert torch.equal(loaded(x, t), fused(x, t))


def test_channels_last_and_contiguous_inputs_and_models_give_the_same_output():
    eager, fused = pair(16)
    x, t = inputs(3)
    with torch.no_grad():
        expected = eager(x, t)
        fused_cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)  # as device_layout makes it on CUDA
        for model in (fused, fused_cl):
            for xin in (x, x.contiguous(memory_format=torch.channels_last)):
                out = model(xin, t)
                assert max_diff(out, expected) <= 1e-5 * expected.abs().max().item()
                assert out.is_contiguous()


def test_the_fused_pieces_match_their_eager_modules():
    torch.manual_seed(0)
    norm = nn.GroupNorm(4, 16)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.normal_(norm.bias)
    x, emb = torch.randn(3, 16, 7, 7), torch.randn(3, 16)
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        got = group_norm_act(xin, norm, emb)
        torch.testing.assert_close(got, torch.nn.functional.silu(norm(x + emb[:, :, None, None])))
        torch.testing.assert_close(group_norm_act(xin, norm, act=False), norm(x))
    for conv in (nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 1, 3, padding=1), nn.Conv2d(3, 5, 1)):
        xin = torch.randn(2, conv.in_channels, 9, 9)
        torch.testing.assert_close(padded_conv(xin, conv), conv(xin))


def test_a_training_step_with_fused_gives_eager_gradients():
    eager, fused = pair(16)
    x, t = inputs(4)
    target = torch.randn_like(x)
    grads = []
    for model in (eager, fused):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x, t), target).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k, g in grads[0].items():
        assert g.abs().max() > 0, k  # every parameter takes part
        torch.testing.assert_close(grads[1][k], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=k)


def test_fused_setting_resolves_auto_to_cuda_only_and_stays_out_of_the_training_key():
    assert accel.fused_enabled("auto", "cuda") and not accel.fused_enabled("auto", "cpu")
    assert accel.fused_enabled("on", "cpu") and not accel.fused_enabled("off", "cuda")
    assert "fused" in RUNTIME_FIELDS
    c = Config(**TINY)
    assert c.fused == "auto" and c.replace(fused="on").training_key() == c.training_key()
    assert Config.from_dict(json.loads(json.dumps(c.replace(fused="off").to_dict()))).fused == "off"
    assert Config.from_dict({k: v for k, v in c.to_dict().items() if k != "fused"}).fused == "auto"  # old configs
    with pytest.raises(ValueError, match="unknown --fused 'fast'"):
        c.replace(fused="fast")
    assert build_model(c.replace(fused="on"), "cpu").fused and not build_model(c, "cpu").fused


def test_where_the_fused_forward_cannot_run_one_warning_and_the_eager_forward():
    """With only a CUDA attention kernel allowed, the CPU has none for the fused attention (a real failure, as
    on a machine whose kernels don't fit): `use_fused` warns once (a second model, e.g. the sampling copy, does
    not try again) and the model computes exactly the eager forward."""
    eager, _ = pair(8)
    x, t = inputs(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            models = [accel.use_fused(copy.deepcopy(eager), "on") for _ in range(2)]
            outs = [m(x, t) for m in models]
    messages = [str(w.message) for w in caught if issubclass(w.category, accel.CompileFallbackWarning)]
    assert len(messages) == 1 and "the fused UNet forward failed for fused" in messages[0], messages
    assert accel.fell_back() == ["fused"] and not any(m.fused for m in models)
    expected = eager(x, t)
    assert all(torch.equal(out, expected) for out in outs)


@pytest.mark.parametrize("value", ["off", "on", "auto"])
def test_fused_option_parses(value):
    result = CliRunner().invoke(cli.cli, ["train", "--dry-run", *tiny_args(), "--fused", value])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["fused"] == value


@pytest.mark.parametrize("command", ["train", "sweep", "sample", "evaluate", "bench"])
def test_a_bad_fused_value_exits_2(command):
    result = CliRunner().invoke(cli.cli, [command, "--fused", "fast"])
    assert result.exit_code == 2 and "'fast' is not one of" in result.output, result.output


def test_a_resumed_study_may_change_fused_as_it_may_change_compile():
    from mnist_diff.study.storage import changed_settings

    recorded = {**Config(**TINY).to_dict(), "compile": "off", "fused": "off"}
    assert changed_settings(recorded, {**recorded, "compile": "on", "fused": "on"}) == ""
    assert changed_settings(recorded, {**recorded, "epochs": 3}) != ""  # so that the check above can fail
    old = {k: v for k, v in recorded.items() if k != "fused"}  # a study made before the field
    assert changed_settings(old, {**recorded, "fused": "on"}) == ""
