"""The report's figures: selection FID against epoch, mean best FID per grid dimension, each config's samples at
its best epoch. Take the analysis' data; draw with matplotlib (`plots`)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from mnist_diff.report.points import Point, fmt, group_label, label


def fid_vs_epoch_figure(complete: dict):
    """Selection FID against epoch, one panel per schedule; with several seeds, the seed mean per epoch."""
    from mnist_diff.tracking.figures import plt

    by_cfg = defaultdict(list)
    for p, r in complete.items():  # `complete` is in grid order, so panels and lines are too
        by_cfg[p.config].append(r["epoch_fids"])
    schedules = list(dict.fromkeys(c[0] for c in by_cfg)) or ["(no results)"]
    fig, axes = plt.subplots(1, len(schedules), figsize=(4 * len(schedules), 3.6), sharey=True, squeeze=False)
    for ax, s in zip(axes[0], schedules):
        for cfg in (c for c in by_cfg if c[0] == s):
            epochs = sorted(set.intersection(*(set(f) for f in by_cfg[cfg])))
            ys = [np.mean([f[e] for f in by_cfg[cfg]]) for e in epochs]
            ax.plot(
                epochs,
                ys,
                marker=".",
                label=f"T={cfg[1]} β={cfg[2]:g} {cfg[3]}" + "".join(f" {k}={fmt(v)}" for k, v in cfg[4]),
            )
        ax.set(title=s, xlabel="epoch")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.set_yscale("log")  # FID falls by an order of magnitude over training
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("selection FID")
    fig.tight_layout()
    return fig


def mean_bars_figure(means: dict):
    from mnist_diff.tracking.figures import plt

    fig, axes = plt.subplots(1, len(means), figsize=(4.4 * len(means), 3.6), squeeze=False)
    for ax, m in zip(axes[0], means.values()):
        title = m["title"]
        groups = [g for g in m["groups"] if g["mean"] is not None]
        x = range(len(groups))
        ax.bar(
            x, [g["mean"] for g in groups], yerr=[g["std"] or 0 for g in groups], capsize=4, color=[f"C{i}" for i in x]
        )
        ax.set_xticks(list(x), [group_label(g["group"]) for g in groups], fontsize=8)
        ax.set(title=f"by {title}", ylabel="mean best FID (± std)")
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def montage_figure(complete: dict):
    """Each config's grid at its best epoch (of its best seed), in grid order; returns (figure, configs
    without a grid file)."""
    from PIL import Image

    from mnist_diff.tracking.figures import plt

    shown, absent = [], []
    for cfg in dict.fromkeys(p.config for p in complete):
        p, r = min(((p, r) for p, r in complete.items() if p.config == cfg), key=lambda x: x[1]["best_fid"])
        path = Path(r["samples_dir"]) / f"epoch-{r['best_epoch']:03d}.png" if r["samples_dir"] else None
        if path is not None and path.is_file():
            shown.append((p, r, path))
        else:
            absent.append(label(cfg) + (f" ({path})" if path else " (no samples_dir)"))
    cols = min(4, max(1, len(shown)))
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (p, r, path) in zip(axes.flat, shown):
        with Image.open(path) as im:
            ax.imshow(np.asarray(im.convert("L")), cmap="gray", vmin=0, vmax=255)
        ax.set_title(
            f"{p.schedule} T={p.timesteps} β={p.beta_end:g} {p.sampler}"
            + "".join(f" {k}={fmt(v)}" for k, v in p.extra)
            + "\n"
            f"FID {r['best_fid']:.2f} @ epoch {r['best_epoch']}",
            fontsize=8,
        )
    if not shown:
        axes[0][0].text(0.5, 0.5, "no sample sheets found", ha="center", va="center")
    fig.tight_layout()
    return fig, absent


def schedule_settings(expected: list[Point], fixed: dict) -> list[tuple]:
    """(schedule, T, beta_start, beta_end) for each distinct schedule setting in the grid."""
    b0 = float(fixed.get("beta_start", 1e-4))
    return list(dict.fromkeys((p.schedule, p.timesteps, b0, p.beta_end) for p in expected))
