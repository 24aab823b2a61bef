"""Writes a study's report: report.md/.html/.json and the figures. No mlflow import here: a tracker, when given,
is duck-typed."""

from __future__ import annotations

import json
from pathlib import Path

from mnist_diff.report.analysis import FIGURES, _prepare, analyse
from mnist_diff.report.figures import (
    fid_vs_epoch_figure,
    mean_bars_figure,
    montage_figure,
    schedule_settings,
)
from mnist_diff.report.render import report_blocks, to_html, to_markdown
from mnist_diff.tracking import figures as plots


def write_report(records: list[dict], study: dict, out_dir: Path, *, tracker=None) -> dict:
    """Write report.md/.html/.json and the figures into out_dir; log them to `tracker` under report/."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    a = analyse(records, study)
    _, expected, complete, _, _ = _prepare(records, study)

    plots.save(fid_vs_epoch_figure(complete), out_dir / "fid_vs_epoch.png")
    plots.save(mean_bars_figure(a["means"]), out_dir / "mean_fid_bars.png")
    fig, montage_missing = montage_figure(complete)
    plots.save(fig, out_dir / "samples_montage.png")
    plots.save(plots.schedule_figure(schedule_settings(expected, a["fixed"])), out_dir / "schedules.png")

    a["montage_missing"] = montage_missing
    blocks = report_blocks(a, montage_missing)
    (out_dir / "report.md").write_text(to_markdown(blocks))
    (out_dir / "report.html").write_text(to_html(blocks, f"Study {a['study_name']}"))
    a["files"] = ["report.md", "report.html", "report.json", *FIGURES]
    (out_dir / "report.json").write_text(json.dumps(a, indent=2, default=str))
    if tracker is not None:
        for name in a["files"]:
            tracker.log_artifact(out_dir / name, "report")
    return a
