"""The command line: the click group and one module per command. A command parses its options, builds its
config, calls the package, and prints. Heavy libraries (torch, mlflow, optuna) are imported inside the
commands, so `--help` answers at once; bad input exits with code 2 and a one-line reason before any work."""

from __future__ import annotations

import click

from mnist_diff.cli.bench import bench
from mnist_diff.cli.evaluate import evaluate
from mnist_diff.cli.group import OneLineErrors
from mnist_diff.cli.report import report
from mnist_diff.cli.sample import sample
from mnist_diff.cli.sweep import sweep
from mnist_diff.cli.train import train


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """Train, sample, score and compare diffusion models on MNIST."""


for command in (train, sample, evaluate, sweep, report, bench):
    cli.add_command(command)


def main() -> None:
    """The `mnist-diff` console script."""
    cli()
