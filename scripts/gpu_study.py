"""One prepared GPU session: bench the device, fit the study's FID protocol into the time left, run the whole
reference study, write its report, and pack what a reader needs into one archive.

    . .devkit/setup.sh && python scripts/gpu_study.py --budget 560 --pack "$OUT/gpu-study.tar.gz"

Every step is a `cli.py` command a user could type; this script only picks the protocol and keeps time.
The protocol: the study's 16 configs, 20 epochs, batch 128 always; the per-epoch selection FID (images,
every N epochs) and the final FID's images are reduced along `workload.PROTOCOL_STEPS` until the projection
from this device's own bench rates fits. `--rehearse` runs the same steps tiny on a CPU (smoke preset, one
schedule) so that a mistake costs no GPU time.

A study longer than one device call: plan it for the device time of both calls (`--plan`), let the first call
stop at its `--budget` (the sweep saves its trials and checkpoints), then, on the same warm machine, finish it:

    python scripts/gpu_study.py --budget 575 --plan 810 --pack "$OUT/gpu-study.tar.gz"
    python scripts/gpu_study.py --resume --budget 235 --pack "$OUT/gpu-study2.tar.gz"

`--resume` reads the run folder's bench and protocol, runs the same `sweep` (which goes on where it stopped)
and the report. `--bench FILE` plans with an earlier bench of the same card instead of benching again.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mnist_diff.perf import workload  # noqa: E402  (after the sys.path line above)
from mnist_diff.study.grid import reference_configs  # noqa: E402  (after the sys.path line above)

REPORT_RESERVE_S = 45  # report, figures and packing after the sweep
STARTUP_S = 75  # worker start, CUDA context, compiling new batch shapes (grid, selection)
SAFETY = 1.15  # the projection leaves out checkpoints, MLflow logging and Python between steps


def say(msg: str) -> None:
    print(f"[gpu_study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], timeout: float) -> int | str:
    """Run a cli.py command; at the timeout send SIGTERM (the sweep saves its trials and writes its results),
    then SIGKILL 60 s later. Returns the exit code, or "timeout"."""
    say("$ " + shlex.join(cmd) + f"   (at most {timeout:.0f} s)")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        say("time is up: SIGTERM")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        rc = "timeout"
    say(f"exit {rc} after {time.time() - t0:.0f} s")
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=560, help="seconds for this call, from now")
    ap.add_argument(
        "--plan",
        type=float,
        default=None,
        help="seconds the whole study may take over this call and a --resume call (default: --budget)",
    )
    ap.add_argument("--resume", action="store_true", help="finish the run folder's study: its bench and protocol")
    ap.add_argument(
        "--bench",
        dest="bench_from",
        default=None,
        help="plan with this bench JSON of the same card (docs/study/bench-*.json) instead of benching: "
        "about 2 minutes of device time less, and no new bench figures",
    )
    ap.add_argument("--workers", type=int, default=3, help="sweep workers sharing the GPU")
    ap.add_argument("--run-dir", default="runs/gpu", help="where the study's stores and outputs go")
    ap.add_argument("--pack", default=None, help="write the report, results, logs and stores to this .tar.gz")
    ap.add_argument("--rehearse", action="store_true", help="CPU rehearsal: tiny bench, smoke preset, 1 schedule")
    args = ap.parse_args()
    if args.plan is not None and args.plan < args.budget:
        ap.error("--plan is the whole study's time: at least --budget")
    deadline = time.time() + args.budget
    run_dir = (ROOT / args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    stores = ["--storage", f"sqlite:///{run_dir}/optuna.db", "--tracking-uri", f"sqlite:///{run_dir}/mlflow.db"]
    if args.resume:
        if not (run_dir / "protocol.json").exists():
            ap.error(f"--resume: no study to finish in {run_dir} (protocol.json is missing)")
        protocol = json.loads((run_dir / "protocol.json").read_text())
        say(f"resuming the study of {run_dir}: {protocol}")
    else:
        protocol = plan_study(args, run_dir, py, plan_end=time.time() + (args.plan or args.budget))

    # 3. the study, stopped in time (SIGTERM: trials saved, results written) to leave room for the report
    sweep_rc = run(
        [
            py,
            "cli.py",
            "sweep",
            "--study-name",
            "gpu-study",
            *stores,
            "--out",
            str(run_dir / "sweep"),
            "--workers",
            str(protocol["workers"]),
            "--heartbeat",
            "30",
            "--quiet",
            *protocol["args"],
        ],
        timeout=deadline - time.time() - REPORT_RESERVE_S,
    )
    if sweep_rc == "timeout":
        say(f"the study goes on with: python3 scripts/gpu_study.py --resume --run-dir {args.run_dir} --budget N")

    # 4. the report, from MLflow
    report_rc = run(
        [py, "cli.py", "report", "--study", "gpu-study", "--tracking-uri", stores[3], "--out", str(run_dir / "report")],
        timeout=max(10, deadline - time.time() - 10),
    )
    if args.pack:
        pack(run_dir, Path(args.pack))
    say(f"done: sweep exit {sweep_rc}, report exit {report_rc}; {deadline - time.time():.0f} s of the budget left")
    return 0 if sweep_rc == 0 and report_rc == 0 else 1


def plan_study(args, run_dir: Path, py: str, plan_end: float) -> dict:
    """Bench this device, then fit the protocol into the time left until `plan_end`; written to protocol.json
    (what `--resume` reads)."""
    # 1. bench: the figures for docs/BENCHMARKS.md, cached for the sweep's projection; warms inductor's cache
    bench_json = run_dir / "bench.json"
    safe_mode = []  # what the sweep adds when the default GPU path (bf16, compiled) failed in bench
    if args.bench_from:
        bench_json.write_text(Path(args.bench_from).read_text())
        seed_bench_cache(json.loads(bench_json.read_text()))
    else:
        safe_mode = run_bench(args, bench_json, py)
    bench = json.loads(bench_json.read_text())
    rates = workload.rates_from_bench(bench, bench["device_type"], source="bench.json")
    say(f"rates: {rates}")
    if not rates.sample_step_seconds and bench["device_type"] == "cuda":  # e.g. a bench from before session 6
        say(
            "this bench has no sampler step latency: small sampling batches (grids, selection sets under "
            "the sampling batch) are under-projected; leave --plan some room"
        )

    # 2. the protocol that fits the time left: each call pays for a start and a report
    calls = 2 if args.plan is not None and args.plan > args.budget else 1
    configs = reference_configs()
    inception = rates.inception_images_per_s
    available = plan_end - time.time() - calls * (REPORT_RESERVE_S + STARTUP_S) - 60_000 / inception
    fit = workload.fit_protocol(configs, rates, available / SAFETY)
    epochs = 20
    if fit is None:  # even the smallest protocol does not fit: fewer epochs, said loudly
        step = workload.PROTOCOL_STEPS[-1]
        full = sum(workload.project_configs([workload.reduce_protocol(c, *step) for c in configs], rates).values())
        epochs = max(1, int(20 * available / SAFETY / full))
        fit = (step, full * epochs / 20)
        say(f"NOT FAITHFUL: even the smallest FID protocol does not fit; {epochs} epochs instead of 20")
    (select, every, final), projected = fit
    say(
        f"protocol: selection FID on {select} images every {every} epoch(s), final FID on {final} images; "
        f"{epochs} epochs; projected {projected:.0f} s (serial) of {available:.0f} s available in {calls} call(s)"
    )
    sweep_args = [
        "--fid-select-samples",
        str(select),
        "--fid-every",
        str(every),
        "--fid-samples",
        str(final),
        "--sheet-every",
        str(every),
        "--epochs",
        str(epochs),
        *safe_mode,
    ]
    if args.rehearse:
        sweep_args = ["--preset", "smoke", "--schedule", "linear", "--timesteps", "200", "--device", "cpu"]
    protocol = {
        "fid_select_samples": select,
        "fid_every": every,
        "fid_samples": final,
        "epochs": epochs,
        "projected_serial_s": projected,
        "available_s": available,
        "calls": calls,
        "workers": args.workers,
        "safe_mode": safe_mode,
        "rehearsal": args.rehearse,
        "args": sweep_args,
    }
    (run_dir / "protocol.json").write_text(json.dumps(protocol, indent=1))
    return protocol


def run_bench(args, bench_json: Path, py: str) -> list[str]:
    """`cli.py bench` into bench_json, with fallbacks. Returns what the sweep must add when the default GPU path
    (bf16, compiled) failed in bench."""
    bench_args = (
        ["--device", "cpu", "--compile", "off", "--repeats", "1", "--train-steps", "1", "--sample-steps", "4"]
        if args.rehearse
        else ["--repeats", "3", "--train-steps", "30", "--sample-steps", "20"]
    )
    rc = run([py, "cli.py", "bench", *bench_args, "--json", str(bench_json)], timeout=min(240, args.budget / 3))
    if rc == "timeout":  # slow compilation, not a failure: eager rates for the projection, the sweep as is
        say("bench ran out of time: a quick eager bench for the projection")
        run(
            [
                py,
                "cli.py",
                "bench",
                "--compile",
                "off",
                "--repeats",
                "1",
                "--train-steps",
                "20",
                "--sample-steps",
                "10",
                "--json",
                str(bench_json),
            ],
            timeout=90,
        )
    elif rc != 0:  # eager failed too (bench falls back from compiling by itself)
        say("bench failed: once more in fp32, eager; the study then runs that way")
        safe_mode = ["--precision", "fp32", "--compile", "off"]
        run(
            [
                py,
                "cli.py",
                "bench",
                *safe_mode,
                "--repeats",
                "1",
                "--train-steps",
                "20",
                "--sample-steps",
                "10",
                "--json",
                str(bench_json),
            ],
            timeout=120,
        )
        return safe_mode
    return []


def seed_bench_cache(result: dict) -> None:
    """Put a bench of this card where `sweep`'s projection looks, so that it does not run a quick bench (which
    compiles) of its own."""
    import torch

    from mnist_diff.perf import bench_cache

    device = torch.device(result["device_type"])
    if device.type == "cuda" and not torch.cuda.is_available():
        say("no CUDA here: the sweep's projection measures its own quick bench")
        return
    if bench_cache.device_name(device) != result["device"]:
        say(f"the bench is of {result['device']}, this is {bench_cache.device_name(device)}: planning with its rates")
    bench_cache.save(result, device, result["precision"])


def pack(run_dir: Path, dest: Path) -> None:
    """Everything small: bench, protocol, report (md, json, html, figures), results, logs, per-trial results,
    the grids of a few epochs, the two SQLite stores. No checkpoints, no copies in MLflow's artifact folder."""
    keep = {".json", ".md", ".html", ".png", ".log", ".db", ".txt", ".csv"}
    grids = {f"epoch-{e:03d}.png" for e in (1, 5, 10, 20)}

    def wanted(path: Path, suffixes) -> bool:
        parts = path.relative_to(run_dir).parts
        if not path.is_file() or path.suffix not in suffixes or "checkpoints" in parts or parts[0] == "mlruns":
            return False
        return "samples" not in parts or path.name in grids

    dest.parent.mkdir(parents=True, exist_ok=True)
    for suffixes in (keep, keep - {".db"}):  # what comes back from the GPU machine is at most 16 MiB a file
        with tarfile.open(dest, "w:gz") as tar:
            for path in sorted(run_dir.rglob("*")):
                if wanted(path, suffixes):
                    tar.add(path, arcname=str(path.relative_to(run_dir.parent)))
        if dest.stat().st_size < 15 * 2**20:
            break
    say(f"packed {dest} ({dest.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
