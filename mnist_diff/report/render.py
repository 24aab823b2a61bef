"""The report as text: `report_blocks` turns the analysis (`report.analyse`) into headed blocks, which
`to_markdown` and `to_html` render. No analysis here, no figures."""

from __future__ import annotations

import html
import re

from mnist_diff.perf.workload import format_duration as _duration
from mnist_diff.report.analysis import MIN_SEEDS, NOT_ENOUGH_SEEDS
from mnist_diff.report.points import REFERENCE_FIELDS, Point, fmt, group_label, label


def _num(x, fmt=".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _pm(mean, std) -> str:
    return _num(mean) + ("" if std is None else f" ± {std:.2f}")


def report_blocks(a: dict, montage_missing: list[str]) -> list[tuple]:
    """The report as blocks: (h1|h2|p, text), (ul, items), (table, headers, rows), (img, file, alt)."""
    b = [("h1", f"Study `{a['study_name']}`: report")]
    n, k = a["points_expected"], a["points_complete"]
    b.append(
        (
            "p",
            f"**PARTIAL: {k} of {n} grid points complete.** Claims that need the missing points are "
            "undetermined; means use the complete points only."
            if a["partial"]
            else f"Complete: all {n} grid points have a COMPLETE result.",
        )
    )
    if a.get("pieces"):
        parts = "; ".join(
            f"{p['results']} ({p['complete']}/{p['grid_size']}"
            + (", stopped before the deadline" if p["stopped"] else "")
            + ")"
            for p in a["pieces"]
        )
        b.append(("p", f"Merged from {len(a['pieces'])} pieces: {parts}."))
        if a.get("merge_notes"):
            b.append(("ul", a["merge_notes"]))
    grid = a["grid"] or {}
    dims = "; ".join(f"{key} = {v}" for key, v in grid.items())
    fixed = ", ".join(f"{key}={v}" for key, v in a["fixed"].items())
    b.append(("p", f"Grid: {dims}." + (f" Fixed: {fixed}." if fixed else "")))
    changes = a.get("protocol_changes")
    if changes:
        named = ", ".join(f"{k} {c['value']} (default {c['default']})" for k, c in changes.items())
        b.append(
            (
                "p",
                f"**Not the default protocol: {named}.** The defaults are the reference study's (20 epochs, "
                "batch 128, an FID after every epoch) with 2,000 selection and 10,000 final images; the "
                "claims below are checked on this study's protocol."
                + (
                    f" `sweep --time-budget {_duration(a['fixed']['time_budget'])}` chose it."
                    if a["fixed"].get("time_budget")
                    else ""
                ),
            )
        )
    registered = a.get("registered_model")
    if registered:
        name, version = registered["name"], registered["version"]
        alias = (
            " (the alias `champion`)"
            if registered.get("champion")
            else " (not the champion: an earlier one scored lower)"
        )
        b.append(
            (
                "p",
                f"**Model:** the best trial's model is registered as `{name}` version {version}{alias}: "
                f'load it with `mlflow.pyfunc.load_model("models:/{name}/{version}")`.',
            )
        )
    clip = {
        True: "on (clip_x0=True): both samplers clip the predicted x0 to [-1, 1] at every step",
        False: "off (clip_x0=False): the samplers follow the closed-form updates unclipped",
        None: "not recorded (studies from before the clip_x0 option always clipped)",
    }[a["clip_x0"]]
    b.append(
        (
            "p",
            f"**x0 clipping: {clip}.** Clipping changes DDPM (clipped at each of its T steps) and DDIM "
            "(clipped at each of its ddim_steps steps, eps recomputed from the clipped x0) differently, "
            "so the DDPM-vs-DDIM comparison (claims 4 and 5) holds for this setting only.",
        )
    )
    b.append(
        (
            "p",
            "best FID = the final FID of each config's best epoch; the best epoch is chosen by the per-epoch "
            "selection FID (best_fid_select, fewer samples). Lower is better.",
        )
    )
    if a["multi_seed"]:
        few = len(a["seeds"]) < MIN_SEEDS
        b.append(
            (
                "p",
                f"Seeds {a['seeds']}: values are mean ± std (sample std, ddof=1) over seeds. "
                f"Seed spread method: {a['spread_method']}."
                + (
                    f" With {len(a['seeds'])} seeds the seed-spread column says {NOT_ENOUGH_SEEDS}: "
                    "no difference below can yet be told apart from seed noise."
                    if few
                    else ""
                ),
            )
        )
    else:
        b.append(
            (
                "p",
                f"One seed ({a['seeds'] or 'none'}): no seed-to-seed spread can be estimated, so no "
                "difference below can be told apart from seed noise.",
            )
        )
    b.append(("p", "Note: the cosine schedule ignores beta_start/beta_end; its two settings differ only in T."))

    b.append(("h2", "Best config" + (" (among the complete points so far)" if a["partial"] else "")))
    best = a["best"]
    b.append(
        (
            "p",
            "none (no complete result)"
            if best is None
            else f"**{label((best['schedule'], best['timesteps'], best['beta_end'], best['sampler']))}**: best FID "
            f"{_pm(best['best_fid_mean'], best['best_fid_std'])} (best epoch "
            f"{', '.join(map(str, best['best_epoch']))})",
        )
    )

    if a["claims"]:
        b.append(("h2", "Reference claims"))
        if a["varied"]:
            one = len(a["varied"]) == 1
            b.append(
                (
                    "p",
                    f"Checked on the points where {', '.join(a['varied'])} {'takes' if one else 'take'} the "
                    f"reference study's value{'' if one else 's'} (the default{'' if one else 's'}).",
                )
            )
        b.append(
            (
                "table",
                ["#", "claim", "verdict", "numbers", "vs seed spread"],
                [
                    [c["claim"], c["text"], f"**{c['verdict']}**", c["numbers"], c["spread"]["text"]]
                    for c in a["claims"]
                ],
            )
        )
    else:
        b.append(
            (
                "p",
                "The reference claims are not checked: they need all 16 reference configs (4 schedules × "
                "(T, β_end) in {(200, 0.08), (1000, 0.02)} × DDPM, DDIM), which this grid does not hold.",
            )
        )

    extra = list(a["configs"][0]["extra"]) if a["configs"] else []
    b.append(("h2", "All configs (sorted by best FID)"))
    b.append(
        (
            "table",
            [
                "schedule",
                "T",
                "β_end",
                "sampler",
                *extra,
                "seeds",
                "best FID",
                "best epoch",
                "best_fid_select",
                "train s",
                "final sampling s",
                "trial s",
            ],
            [
                [
                    r["schedule"],
                    r["timesteps"],
                    f"{r['beta_end']:g}",
                    r["sampler"],
                    *(fmt(r["extra"][f]) for f in extra),
                    len(r["seeds"]),
                    _pm(r["best_fid_mean"], r["best_fid_std"]),
                    ", ".join(map(str, r["best_epoch"])),
                    _num(r["best_fid_select_mean"]),
                    _num(r["train_seconds_mean"], ".0f"),
                    _num(r["final_sampling_seconds_mean"], ".1f"),
                    _num(r["trial_seconds_mean"], ".0f"),
                ]
                for r in a["configs"]
            ],
        )
    )

    for m in a["means"].values():
        title = m["title"]
        b.append(("h2", f"Mean best FID by {title}"))
        b.append(
            (
                "table",
                [title, "mean", "std", "n (complete / expected)", "vs the best (paired over seeds)"],
                [
                    [
                        group_label(g["group"]),
                        _num(g["mean"]),
                        _num(g["std"]),
                        f"{g['n']} / {g['n_expected']}",
                        g["vs_best"]["text"],
                    ]
                    for g in m["groups"]
                ],
            )
        )

    spent = a["time"]["seconds"]
    if spent:
        total = sum(spent.values()) or 1.0
        b.append(("h2", "Where the time went"))
        b.append(
            (
                "p",
                f"Seconds per phase, summed over the {a['time']['trials']} trials that recorded them "
                "(trials on several workers overlap: the sum exceeds the wall time).",
            )
        )
        b.append(
            (
                "table",
                ["phase", "seconds", "share"],
                [[k.replace("_", " "), _num(v, ".1f"), f"{100 * v / total:.0f}%"] for k, v in spent.items()]
                + [["total", _num(sum(spent.values()), ".1f"), "100%"]],
            )
        )
    projected = a["time"].get("projection")
    if projected:
        parts = ", ".join(f"{k} {_duration(v)}" for k, v in projected["seconds"].items())
        b.append(
            (
                "p",
                f"Projected when the study started, serial, at the rates of {projected['device']}: {parts}; "
                f"total {_duration(sum(projected['seconds'].values()))} ({projected['rates']}). The sums "
                "above overlap where several workers ran at once; each pays its own start-up and compiling.",
            )
        )

    b.append(("h2", "Missing / incomplete"))
    b.append(
        (
            "ul",
            [
                f"{_point_label(m['point'])}: {m['state']}"
                + ("" if m["trial"] is None else f" (trial {m['trial']})")
                + (f": {str(m['error']).splitlines()[0][:200]}" if m["error"] else "")
                for m in a["missing"]
            ]
            or ["none"],
        )
    )
    if a["off_grid_runs"]:
        b.append(("p", f"Ignored {len(a['off_grid_runs'])} complete run(s) outside the grid: {a['off_grid_runs']}"))

    b.append(("h2", "Figures"))
    b.append(("img", "fid_vs_epoch.png", "selection FID against epoch, every config"))
    b.append(("img", "mean_fid_bars.png", "mean best FID by each grid dimension"))
    b.append(("img", "samples_montage.png", "each config's samples at its best epoch"))
    if montage_missing:
        b.append(("p", "Sample grids not found (left out of the montage): " + "; ".join(montage_missing) + "."))
    b.append(("img", "schedules.png", "alpha_bar and log-SNR of the grid's schedule settings"))
    return b


def _point_label(d: dict) -> str:
    extra = tuple((k, v) for k, v in d.items() if k not in (*REFERENCE_FIELDS, "seed"))
    return label(Point(d["schedule"], d["timesteps"], d["beta_end"], d["sampler"], d["seed"], extra))


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "ul":
            out.append("\n".join(f"- {i}" for i in rest[0]))
        elif kind == "table":
            head, rows = rest
            cell = lambda x: str(x).replace("|", "\\|")  # noqa: E731
            out.append(
                "\n".join(
                    ["| " + " | ".join(map(cell, head)) + " |", "|" + "---|" * len(head)]
                    + ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
                )
            )
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
    return "\n\n".join(out) + "\n"


def _inline(text) -> str:
    s = html.escape(str(text))
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def to_html(blocks: list[tuple], title: str) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{_inline(rest[0])}</{kind}>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in rest[0]) + "</ul>")
        elif kind == "table":
            head, rows = rest
            out.append(
                "<table><tr>"
                + "".join(f"<th>{_inline(h)}</th>" for h in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
        elif kind == "img":
            out.append(f'<p><img src="{html.escape(rest[0])}" alt="{html.escape(rest[1])}"></p>')
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:90%}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n"
    )
