"""A study's worker processes on one machine: `run_workers` starts N (spawned, one GPU each in turn when there
are several), gives each its share of the CPU cores, passes each SIGTERM/SIGINT it receives on to them (each
worker saves its trial and stops), shows the study's progress bar while they run, and returns their exit codes.
What a worker does is `worker.work`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mnist_diff.study.spec import Sweep


def run_workers(sweep: Sweep, parent_run_id: str, workers: int) -> list:
    """Start the worker processes and wait for them; return their exit codes. SIGTERM or SIGINT received here
    (as `Interrupted`/KeyboardInterrupt) is passed on to each worker, which saves its trial and stops; then
    the interrupt is raised again."""
    import multiprocessing as mp
    import multiprocessing.connection  # noqa: F401  (mp.connection.wait)

    import torch

    gpus = torch.cuda.device_count()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_process, args=(sweep, parent_run_id, i % gpus if gpus > 1 else None, workers))
        for i in range(workers)
    ]
    interrupt = None
    try:
        for p in procs:
            p.start()
    except KeyboardInterrupt as err:
        interrupt = err
    from mnist_diff.study.progress import STUDY_BAR_SECONDS, StudyBar

    bar = StudyBar(sweep)
    while True:
        if interrupt is not None:
            sig = getattr(interrupt, "signum", signal.SIGINT)  # Ctrl-C outside StopSignals: SIGINT
            for p in procs:
                if p.pid is not None and p.exitcode is None:
                    try:
                        os.kill(p.pid, sig)
                    except ProcessLookupError:
                        pass
        try:
            running = [p.sentinel for p in procs if p.pid is not None and p.exitcode is None]
            while running:
                mp.connection.wait(running, timeout=STUDY_BAR_SECONDS)
                bar.update()
                running = [p.sentinel for p in procs if p.pid is not None and p.exitcode is None]
            break
        except KeyboardInterrupt as err:  # a first or a second signal: pass it on too
            interrupt = err
    bar.close()
    if interrupt is not None:
        raise interrupt
    return [p.exitcode for p in procs]


def worker_threads(workers: int) -> int:
    """Torch threads of each of `workers` worker processes: their share of the CPU cores (N workers each using
    every core oversubscribe them: OpenMP threads spin)."""
    return max(1, (os.cpu_count() or 1) // workers)


def _worker_process(sweep: Sweep, parent_run_id: str, gpu: int | None, workers: int) -> None:
    # Own process group: a Ctrl-C in the terminal reaches only the parent, which passes it on once (a second
    # signal would stop a worker at once, without saving the current step).
    os.setpgrp()
    # Quiet: N processes' bars on one terminal overwrite each other; the parent shows the study's bar instead.
    sweep = dataclasses.replace(sweep, progress=False)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    import torch

    torch.set_num_threads(worker_threads(workers))
    from mnist_diff.study.worker import setup_logging, work
    from mnist_diff.training.trainer import StopSignals

    setup_logging(sweep.out_dir)
    try:
        with StopSignals():
            work(sweep, parent_run_id)
    except KeyboardInterrupt:  # stopped by the parent: the trial is saved and marked; no traceback
        raise SystemExit(130) from None
