"""mnist-diff: train, sample, score and compare diffusion models on MNIST.

The package is layered. Bottom to top, each layer a folder (or a module at the top level); a module imports
only from its own layer and the layers below it, and no imports go round in a cycle (`tests/test_layers.py`
checks both, imports inside functions included):

    util, choices, presets, config   atomic writes, locks, redaction, cache paths; the lists of choices; the
                                     presets as data; the frozen, validated `Config`
    diffusion    schedules, forward process, samplers, the UNet: pure math, torch only
    runtime      device and numerics, compile and CUDA graphs, data, checkpoints, batched generation, timing
    fid          the FID engine (torch-fidelity's Inception, reference statistics)
    training     the trainer, and one experiment: train, select the epoch by FID, score it
    tracking     MLflow (the only mlflow imports): runs written and read back, the model and its registry, the
                 training callback, figures
    perf         bench, its per-device cache, the workload model that projects a study's time
    study        the Optuna grid study (the only optuna imports): storage, retries, objective, workers
    report       the study's findings: analysis, text, figures, reading a study back
    cli          the click commands: parse, build the config, call one function, print
"""

__version__ = "0.1.0"

LAYERS = (
    ("util", "choices", "presets", "config"),
    ("diffusion",),
    ("runtime",),
    ("fid",),
    ("training",),
    ("tracking",),
    ("perf",),
    ("study",),
    ("report",),
    ("cli",),
)
