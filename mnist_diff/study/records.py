"""The study's results as records: `grid_search_results.json` and the study's own description (`study.json`)."""

from __future__ import annotations

import os
from pathlib import Path

import optuna

from mnist_diff.study.grid import REFERENCE_FIELDS, Grid
from mnist_diff.study.spec import Sweep
from mnist_diff.util.atomic import write_json


def grid_text(grid: Grid) -> str:
    """The grid as one line, e.g. 'schedule=linear,cosine; timesteps:beta_end=200:0.08,1000:0.02; seed=0'."""
    return "; ".join(f"{d.label}={','.join(str(d.encode(v)) for v in d.values)}" for d in grid.dims)


def study_doc(sweep: Sweep) -> dict:
    """What a reader needs to know of the study besides its trials (study.json, grid_search_results.json)."""
    return {
        "study_name": sweep.study_name,
        "grid": sweep.grid_description(),
        "grid_fields": sweep.grid.fields(),
        "fixed": sweep.fixed,
        "projection": sweep.projection,
    }


def records(study: optuna.Study, sweep: Sweep) -> list[dict]:
    """One record per trial, in the format of grid_search_results.json: its params are the reference fields
    and every field the grid sets."""
    out = []
    grid = sweep.grid
    for t in study.get_trials(deepcopy=False):
        if not t.params:
            continue
        fields = grid.overrides(t.params)
        config = sweep.base.replace(**fields)
        a = t.user_attrs
        out.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "params": {**{k: getattr(config, k) for k in (*REFERENCE_FIELDS, "seed")}, **fields},
                "best_fid": a.get("best_fid"),
                "best_epoch": a.get("best_epoch"),
                "best_fid_select": a.get("best_fid_select"),
                "epoch_fids": a.get("epoch_fids", {}),
                "run_id": a.get("mlflow_run_id"),
                "trained_by_run_id": a.get("trained_by_run_id"),
                "train_seconds": a.get("train_seconds"),
                "final_sampling_seconds": a.get("final_sampling_seconds"),
                "samples_dir": relative_to(a.get("samples_dir"), sweep.out_dir),
                "phase_seconds": a.get("phase_seconds"),
                "retries": a.get("retries", 0),
                "error": a.get("error"),
            }
        )
    return out


def relative_to(path: str | None, folder: Path) -> str | None:
    """`path` relative to `folder` (the study's --out, where grid_search_results.json lies) when inside it, so the
    folder can move to another machine and be read there (`report --results`); else as it is."""
    if not path:
        return path
    full, root = Path(path).absolute(), Path(folder).absolute()
    if not full.is_relative_to(root):
        return path
    return Path(os.path.relpath(full, root)).as_posix()


def write_results(study: optuna.Study, sweep: Sweep, stopped: str | None = None) -> dict:
    """Write grid_search_results.json; `stopped`: why the command ended with points left (--stop-after), or None."""
    recs = records(study, sweep)
    complete = [r for r in recs if r["state"] == "COMPLETE" and r["best_fid"] is not None]
    doc = {
        **study_doc(sweep),
        "complete": len(complete),
        "grid_size": sweep.size,
        "results": recs,
        "best": min(complete, key=lambda r: r["best_fid"]) if complete else None,
        "stopped": stopped,
    }
    write_json(sweep.out_dir / "grid_search_results.json", doc)
    return doc


def phase_sums(results: list[dict]) -> dict[str, float]:
    """Seconds per phase summed over the trials that recorded them (see `timing`)."""
    sums: dict[str, float] = {}
    for r in results:
        for k, v in (r.get("phase_seconds") or {}).items():
            sums[k] = sums.get(k, 0.0) + v
    return sums
