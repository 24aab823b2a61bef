import subprocess
import sys

PURE = [
    "mnist_diff.diffusion.schedules",
    "mnist_diff.diffusion.forward",
    "mnist_diff.diffusion.samplers",
    "mnist_diff.diffusion.unet",
    "mnist_diff.config",
    "mnist_diff.perf.bench",
    "mnist_diff.runtime.device",
    "mnist_diff.runtime.accel",
]


def test_math_modules_import_no_tracking_study_or_cli_libraries():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in PURE)
        + "bad = sorted(m for m in ('mlflow', 'optuna', 'click', 'torch_fidelity') if m in sys.modules)\n"
        + "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
