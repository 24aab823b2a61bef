"""The study's findings as data: tables, groupings, the reference claims checked against this study's numbers.

Pure functions turn records (one per trial, the `results` of `grid_search_results.json`, or the same built
from MLflow by `report.reader`) into the `report.json` dict. `report.write` writes
the files.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from itertools import product
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mnist_diff.report.points import REFERENCE_FIELDS, Point, group_label, label

HOLDS, NOT_HOLDS, UNDETERMINED = "holds", "does not hold", "undetermined (missing data)"
MIN_SEEDS, CONFIDENCE = 3, 0.95
NOT_ENOUGH_SEEDS = "not enough seeds to tell"
SPREAD_METHOD = (
    "paired t-interval (95%) over seeds: A and B are paired on every other grid parameter and the seed, and "
    "each seed's mean A − B difference is one observation (seeds are the independent replicates: each reruns "
    "the grid from its own initial weights, data order and noise), so n = seeds, df = seeds − 1; a DDPM and a "
    "DDIM result of one grid point and seed share a training (the same weights, sampled two ways): paired, not "
    "independent. A difference exceeds the seed spread iff its interval excludes 0. Also given: the exact "
    f"two-sided sign test over seeds (p < 0.05 needs 6 seeds or more). Below {MIN_SEEDS} seeds: "
    f"{NOT_ENOUGH_SEEDS}"
)
FIGURES = ("fid_vs_epoch.png", "mean_fid_bars.png", "samples_montage.png", "schedules.png")


LEGACY_GRID_FIELDS = {"timesteps_beta_end": ["timesteps", "beta_end"]}  # studies that recorded no grid_fields
SAMPLING_FIELDS = ("sampler", "ddim_steps", "eta", "clip_x0")  # results that differ only in these share a training


def _f(x) -> float:
    return round(float(x), 10)  # so 0.08 from JSON, MLflow's "0.08" and the grid's 0.08 compare equal


def _opt(x, cast=float):
    return None if x is None else cast(x)


def _norm(value):
    return _f(value) if isinstance(value, float) else value


def normalize_record(r: dict) -> dict:
    """One trial record with typed fields (epoch_fids keyed by int epoch); both loaders return these."""
    p = {k: _norm(v) for k, v in (r.get("params") or {}).items()}
    p.update(
        schedule=str(p["schedule"]),
        timesteps=int(p["timesteps"]),
        beta_end=_f(p["beta_end"]),
        sampler=str(p["sampler"]),
        seed=int(p.get("seed", 0)),
    )
    return {
        "trial": _opt(r.get("trial"), int),
        "state": str(r.get("state") or "MISSING"),
        "params": p,
        "best_fid": _opt(r.get("best_fid")),
        "best_epoch": _opt(r.get("best_epoch"), lambda v: int(float(v))),
        "best_fid_select": _opt(r.get("best_fid_select")),
        "epoch_fids": {int(k): float(v) for k, v in (r.get("epoch_fids") or {}).items()},
        "run_id": r.get("run_id"),
        "trained_by_run_id": r.get("trained_by_run_id"),
        "train_seconds": _opt(r.get("train_seconds")),
        "final_sampling_seconds": _opt(r.get("final_sampling_seconds")),
        "samples_dir": r.get("samples_dir"),
        "phase_seconds": {str(k): float(v) for k, v in (r.get("phase_seconds") or {}).items()},
        "error": r.get("error"),
    }


def sort_records(records: list[dict]) -> list[dict]:
    return sorted(records, key=lambda r: (r["trial"] is None, r["trial"] or 0, r["run_id"] or ""))


def load_records_from_json(path) -> tuple[list[dict], dict]:
    """(records, study) from a `grid_search_results.json`; study = everything but `results`. A relative
    `samples_dir` is the study folder's (`records.relative_to`): resolved against the file's folder, so a study
    read where it was copied finds its samples (older files hold absolute paths, kept as they are). ValueError,
    with a one-line reason, for anything else (other JSON, a record without its reference params or of wrong
    types)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("results"), list)
        or not isinstance(data.get("grid"), dict)
    ):
        raise ValueError("expected an object with a 'grid' object and a 'results' list, as `sweep` writes")
    study = {k: v for k, v in data.items() if k != "results"}
    records = []
    for i, r in enumerate(data["results"]):
        try:
            record = normalize_record(r)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"results[{i}] is not a trial record ({type(err).__name__}: {err})") from None
        if record["samples_dir"] and not Path(record["samples_dir"]).is_absolute():
            record["samples_dir"] = str(Path(path).parent / record["samples_dir"])
        records.append(record)
    return sort_records(records), study


def grid_dims(study: dict) -> list[tuple[list, list]]:
    """The study's grid as (fields, values) dimensions, in grid order; each value a tuple, one per field."""
    fields_of = {**LEGACY_GRID_FIELDS, **(study.get("grid_fields") or {})}
    dims = []
    for name, values in (study.get("grid") or {}).items():
        fields = list(fields_of.get(name, [name]))
        dims.append((fields, [tuple(_norm(x) for x in (v if len(fields) > 1 else [v])) for v in values]))
    return dims


def extra_fields(study: dict) -> list[str]:
    """The fields the grid sets besides the reference ones and the seed, in grid order."""
    return [f for fields, _ in grid_dims(study) for f in fields if f not in (*REFERENCE_FIELDS, "seed")]


def point_of(r: dict, extra: list[str] = ()) -> Point:
    p = r["params"]
    return Point(
        p["schedule"], p["timesteps"], p["beta_end"], p["sampler"], p["seed"], tuple((f, p.get(f)) for f in extra)
    )


# -- the grid and which of its points are done ------------------------------------------------------------
def grid_points(study: dict, records: list[dict]) -> list[Point]:
    """Every expected point, in grid order; a reference field the grid omits is taken from the records."""
    dims, extra = grid_dims(study), extra_fields(study)
    covered = {f for fields, _ in dims for f in fields}
    for f in (*REFERENCE_FIELDS, "seed"):
        if f not in covered:
            seen = list(dict.fromkeys(r["params"][f] for r in records)) or ([0] if f == "seed" else [])
            dims.append(([f], [(v,) for v in seen]))
    points = []
    for combo in product(*(values for _, values in dims)):
        d = {f: v for (fields, _), value in zip(dims, combo) for f, v in zip(fields, value)}
        points.append(
            Point(
                d["schedule"],
                int(d["timesteps"]),
                _f(d["beta_end"]),
                d["sampler"],
                int(d["seed"]),
                tuple((f, d[f]) for f in extra),
            )
        )
    return points


def select_points(
    records: list[dict], expected: list[Point], extra: list[str] = ()
) -> tuple[dict, list[dict], list[dict]]:
    """(complete {point: record}, missing [{point, state, trial}], off-grid complete records).

    Records come sorted by trial, so when a point was retried the latest COMPLETE record wins, and an
    incomplete point shows the state of its latest attempt."""
    by_point = defaultdict(list)
    for r in records:
        by_point[point_of(r, extra)].append(r)
    done = {p: [r for r in rs if r["state"] == "COMPLETE" and r["best_fid"] is not None] for p, rs in by_point.items()}
    complete = {p: done[p][-1] for p in expected if done.get(p)}
    missing = []
    for p in expected:
        if p not in complete:
            last = by_point[p][-1] if by_point.get(p) else None
            state = (
                "MISSING"
                if last is None
                else ("COMPLETE (no best_fid)" if last["state"] == "COMPLETE" else last["state"])
            )
            missing.append(
                {"point": p.as_dict(), "state": state, "trial": last and last["trial"], "error": last and last["error"]}
            )
    grid = set(expected)
    off_grid = [rs[-1] for p, rs in done.items() if rs and p not in grid]
    return complete, missing, off_grid


# -- statistics ---------------------------------------------------------------------------------------------
def stats(values: list) -> dict:
    """mean, sample std (ddof=1; None with fewer than 2 values), n."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None, "n": int(len(v))}


def t_interval(diffs, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student's t confidence interval of the mean of paired differences: mean ± t_{(1+c)/2, n-1} s / sqrt(n),
    s the sample std (ddof=1). Exact when the differences are independent and normal, at any n >= 2."""
    from scipy.stats import (
        t,  # imported here: report.py is imported by tracking, and only this needs scipy
    )

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        raise ValueError("a t-interval needs at least 2 differences")
    half = float(t.ppf((1 + confidence) / 2, len(d) - 1)) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return float(d.mean()) - half, float(d.mean()) + half


def sign_test(diffs) -> tuple[int, int, float]:
    """(positives, non-zero differences, exact two-sided p) of the sign test: under H0 the sign of each
    non-zero difference is a fair coin; p = P(a count at least as far from n/2), ties (zeros) dropped."""
    d = [x for x in diffs if x != 0]
    n, k = len(d), sum(x > 0 for x in d)
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return k, n, min(1.0, 2 * tail)


def config_table(complete: dict) -> list[dict]:
    """One row per config (seeds pooled), sorted by mean best FID."""
    groups = defaultdict(list)
    for p, r in complete.items():
        groups[p.config].append((p.seed, r))
    rows = []
    for (s, t, b, m, extra), items in groups.items():
        items.sort(key=lambda x: x[0])
        rs = [r for _, r in items]
        fid = stats([r["best_fid"] for r in rs])
        rows.append(
            {
                "schedule": s,
                "timesteps": t,
                "beta_end": b,
                "sampler": m,
                "extra": dict(extra),
                "seeds": [x for x, _ in items],
                "best_fid_mean": fid["mean"],
                "best_fid_std": fid["std"],
                "best_fid": [r["best_fid"] for r in rs],
                "best_epoch": [r["best_epoch"] for r in rs],
                "best_fid_select_mean": stats([r["best_fid_select"] for r in rs])["mean"],
                "train_seconds_mean": stats([r["train_seconds"] for r in rs])["mean"],
                "final_sampling_seconds_mean": stats([r["final_sampling_seconds"] for r in rs])["mean"],
                # the trial's whole cost (training, sampling, FIDs, I/O): what a width or sampler costs
                "trial_seconds_mean": stats([sum(r["phase_seconds"].values()) or None for r in rs])["mean"],
                "run_ids": [r["run_id"] for r in rs],
            }
        )
    return sorted(rows, key=lambda r: (r["best_fid_mean"], r["schedule"], r["timesteps"], r["sampler"]))


class Grouping(NamedTuple):
    title: str
    key: object  # point -> its group
    blank: object  # point -> the point with the grouped fields blanked: what a paired comparison matches on
    shared_training: bool  # groups differ only in sampling fields: each pair shares a training


def _extra_grouping(f: str) -> Grouping:
    return Grouping(
        f,
        lambda p: dict(p.extra)[f],
        lambda p: p._replace(extra=tuple((k, None if k == f else v) for k, v in p.extra)),
        f in SAMPLING_FIELDS,
    )


def groupings(expected: list[Point]) -> dict[str, Grouping]:
    """The reference dimensions, then each other field that takes more than one value in the grid."""
    out = {
        "schedule": Grouping("schedule", lambda p: p.schedule, lambda p: p._replace(schedule=None), False),
        "timesteps_beta_end": Grouping(
            "(T, β_end)",
            lambda p: (p.timesteps, p.beta_end),
            lambda p: p._replace(timesteps=None, beta_end=None),
            False,
        ),
        "sampler": Grouping("sampler", lambda p: p.sampler, lambda p: p._replace(sampler=None), True),
    }
    for f in dict(expected[0].extra) if expected else ():
        if len({dict(p.extra)[f] for p in expected}) > 1:
            out[f] = _extra_grouping(f)
    return out


def group_means(complete: dict, expected: list[Point]) -> dict:
    """Per grouping: mean (and std) of best_fid over every complete (config, seed) in each group, groups in
    grid order, and each group against the best one, paired on every other field and the seed."""
    fid = {p: r["best_fid"] for p, r in complete.items()}
    out = {}
    for name, g in groupings(expected).items():
        rows = []
        for group in dict.fromkeys(g.key(p) for p in expected):
            st = stats([v for p, v in fid.items() if g.key(p) == group])
            rows.append(
                {
                    "group": list(group) if isinstance(group, tuple) else group,
                    **st,
                    "n_expected": sum(g.key(p) == group for p in expected),
                    "key": group,
                }
            )
        scored = [r for r in rows if r["mean"] is not None]
        best = min(scored, key=lambda r: r["mean"])["key"] if scored else None
        for r in rows:
            group = r.pop("key")
            if best is None or r["mean"] is None or len(scored) < 2:
                r["vs_best"] = {"exceeds_seed_spread": None, "text": "n/a"}
            elif group == best:
                r["vs_best"] = {"exceeds_seed_spread": None, "text": "best"}
            else:
                r["vs_best"] = _spread(
                    fid,
                    lambda p, v=group: g.key(p) == v,
                    lambda p: g.key(p) == best,
                    lambda p: g.blank(p),
                    f"{group_label(r['group'])} − {group_label(best)}",
                    shared_training=g.shared_training,
                )
        out[name] = {"title": g.title, "groups": rows}
    return out


# -- the reference claims -----------------------------------------------------------------------------------
class _NoData(Exception):
    pass


def _means(data: dict, key) -> dict:
    groups = defaultdict(list)
    for p, v in data.items():
        groups[key(p)].append(v)
    return {g: float(np.mean(v)) for g, v in groups.items()}


def _need(means: dict, *groups) -> None:
    lacking = [str(g) for g in groups if g not in means]
    if lacking:
        raise _NoData(f"no results for {', '.join(lacking)}")


def _spread(data: dict, in_a, in_b, match, label: str, shared_training: bool = False) -> dict:
    """Is the A − B difference larger than the seed-to-seed spread? A paired t-interval over the per-seed mean
    differences (see SPREAD_METHOD); `match(p)` must include the seed. `shared_training`: the pairs are the
    DDPM and DDIM results of one training."""
    a = {match(p): (p.seed, v) for p, v in data.items() if in_a(p)}
    b = {match(p): v for p, v in data.items() if in_b(p)}
    keys = sorted(a.keys() & b.keys())
    if not keys:
        return {"exceeds_seed_spread": None, "text": "n/a: no matched pairs"}
    by_seed = defaultdict(list)
    for k in keys:
        by_seed[a[k][0]].append(a[k][1] - b[k])
    per_seed = [float(np.mean(v)) for _, v in sorted(by_seed.items())]
    mean, n = float(np.mean(per_seed)), len(per_seed)
    out = {
        "difference": label,
        "mean_diff": mean,
        "per_seed_diffs": per_seed,
        "n_seeds": n,
        "n_pairs": len(keys),
        "shared_training": shared_training,
    }
    pairs = f"{len(keys)} pairs" + (", each pair sharing a training" if shared_training else "")
    if n < MIN_SEEDS:
        return {
            **out,
            "exceeds_seed_spread": None,
            "text": f"{label} = {mean:+.2f} ({n} seed{'s' * (n != 1)}, {pairs}): {NOT_ENOUGH_SEEDS} "
            f"(needs {MIN_SEEDS} seeds or more)",
        }
    lo, hi = t_interval(per_seed)
    k, n_signs, p = sign_test(per_seed)
    exceeds = lo > 0 or hi < 0
    return {
        **out,
        "ci95": [lo, hi],
        "sign_test": {"positive": k, "n": n_signs, "p": p},
        "exceeds_seed_spread": exceeds,
        "text": f"{label} = {mean:+.2f}, paired 95% t-interval [{lo:+.2f}, {hi:+.2f}] over {n} seeds ({pairs}); "
        f"sign test {k} of {n_signs} seeds > 0, p = {p:.2g}: "
        + ("exceeds seed spread" if exceeds else "within seed spread"),
    }


EXTREME = {"exceeds_seed_spread": None, "text": "n/a: a claim about a single best value, not a mean difference"}
A_PAIR, B_PAIR = (200, _f(0.08)), (1000, _f(0.02))
CLAIM_CONFIG = ("cosine", 200, "ddpm")


def _claim1(data):
    means = _means(data, lambda p: p.schedule)
    _need(means, "quadratic")
    others = {s: m for s, m in means.items() if s != "quadratic"}
    if not others:
        raise _NoData("no other schedule to compare with")
    rival = min(others, key=others.get)
    numbers = "mean best FID: " + ", ".join(f"{s} {m:.2f}" for s, m in sorted(means.items(), key=lambda x: x[1]))
    return (
        means["quadratic"] < means[rival],
        numbers,
        _spread(
            data,
            lambda p: p.schedule == "quadratic",
            lambda p: p.schedule == rival,
            lambda p: (p.timesteps, p.beta_end, p.sampler, p.seed),
            f"quadratic − {rival}",
        ),
    )


def _claim2(data):
    if not any(p.schedule == "cosine" for p in data):
        raise _NoData("no cosine results")
    best = min(data, key=data.get)
    numbers = f"lowest single best FID {data[best]:.2f} ({label(best)})"
    others = {p: v for p, v in data.items() if p.schedule != "cosine"}
    if best.schedule == "cosine" and others:
        rival = min(others, key=others.get)
        numbers += f"; lowest non-cosine {others[rival]:.2f} ({label(rival)})"
    elif best.schedule != "cosine":
        cos = min((p for p in data if p.schedule == "cosine"), key=data.get)
        numbers += f"; lowest cosine {data[cos]:.2f} ({label(cos)})"
    return best.schedule == "cosine", numbers, EXTREME


def _claim3(data):
    means = _means(data, lambda p: (p.timesteps, p.beta_end))
    _need(means, A_PAIR, B_PAIR)
    numbers = (
        f"mean best FID: T=200, β_end=0.08 {means[A_PAIR]:.2f}; T=1000, β_end=0.02 {means[B_PAIR]:.2f}; "
        f"difference {means[A_PAIR] - means[B_PAIR]:+.2f}"
    )
    pair = lambda p: (p.timesteps, p.beta_end)  # noqa: E731
    return (
        means[A_PAIR] < means[B_PAIR],
        numbers,
        _spread(
            data,
            lambda p: pair(p) == A_PAIR,
            lambda p: pair(p) == B_PAIR,
            lambda p: (p.schedule, p.sampler, p.seed),
            "(T=200, β_end=0.08) − (T=1000, β_end=0.02)",
        ),
    )


def _claim4(data):
    means = _means(data, lambda p: p.sampler)
    _need(means, "ddpm", "ddim")
    numbers = (
        f"mean best FID: ddpm {means['ddpm']:.2f}, ddim {means['ddim']:.2f}; "
        f"difference {means['ddpm'] - means['ddim']:+.2f}"
    )
    return (
        means["ddpm"] < means["ddim"],
        numbers,
        _spread(
            data,
            lambda p: p.sampler == "ddpm",
            lambda p: p.sampler == "ddim",
            lambda p: (p.schedule, p.timesteps, p.beta_end, p.seed),
            "ddpm − ddim",
            shared_training=True,
        ),
    )


def _claim5(data):
    mins = {
        m: min((p for p in data if p.sampler == m), key=data.get)
        for m in ("ddpm", "ddim")
        if any(p.sampler == m for p in data)
    }
    _need(mins, "ddpm", "ddim")
    numbers = "; ".join(f"lowest {m} {data[p]:.2f} ({label(p)})" for m, p in mins.items())
    return data[mins["ddpm"]] < data[mins["ddim"]], numbers, EXTREME


def _claim6(data):
    configs = _means(data, lambda p: p.config)
    claimed = {c: v for c, v in configs.items() if (c[0], c[1], c[3]) == CLAIM_CONFIG}
    if not claimed:
        raise _NoData("no cosine, T=200, ddpm results")
    best = min(configs, key=configs.get)
    holds = (best[0], best[1], best[3]) == CLAIM_CONFIG
    rivals = {c: v for c, v in configs.items() if c not in claimed}
    numbers = f"best config {label(best)}: mean best FID {configs[best]:.2f}"
    if not rivals:
        return holds, numbers, {"exceeds_seed_spread": None, "text": "n/a: no other config to compare with"}
    a = min(claimed, key=claimed.get)
    b = min(rivals, key=rivals.get)
    if holds:
        numbers += f"; runner-up {label(b)} {configs[b]:.2f}"
    else:
        numbers += f"; best cosine/T=200/ddpm {label(a)} {configs[a]:.2f}"
    return (
        holds,
        numbers,
        _spread(
            data, lambda p: p.config == a, lambda p: p.config == b, lambda p: p.seed, f"({label(a)}) − ({label(b)})"
        ),
    )


CLAIMS = [
    (1, "quadratic had the lowest mean FID among schedules", lambda p: True, _claim1),
    (2, "cosine had the best single FID", lambda p: True, _claim2),
    (
        3,
        "T=200 with β_end=0.08 beat T=1000 with β_end=0.02 (lower mean FID)",
        lambda p: (p.timesteps, p.beta_end) in (A_PAIR, B_PAIR),
        _claim3,
    ),
    (4, "DDPM beat DDIM in mean FID", lambda p: p.sampler in ("ddpm", "ddim"), _claim4),
    (5, "DDPM beat DDIM in best (min) FID", lambda p: p.sampler in ("ddpm", "ddim"), _claim5),
    (6, "the best config was cosine, T=200, DDPM", lambda p: True, _claim6),
]


def reference_subset(complete: dict, expected: list[Point]) -> tuple[dict, list[Point]] | None:
    """The part of the grid the reference claims are about: the points whose other grid fields have the
    reference study's values (Config's defaults), provided it holds all 16 reference configs; else None."""
    from mnist_diff.config import Config
    from mnist_diff.presets import STUDY_PAIRS, STUDY_SAMPLERS, STUDY_SCHEDULES

    default = Config()
    at_reference = [p for p in expected if all(v == _norm(getattr(default, k)) for k, v in p.extra)]
    have = {(p.schedule, (p.timesteps, p.beta_end), p.sampler) for p in at_reference}
    needed = {(s, (t, _f(b)), m) for s, (t, b), m in product(STUDY_SCHEDULES, STUDY_PAIRS, STUDY_SAMPLERS)}
    if not needed <= have:
        return None
    keep = set(at_reference)
    return {p: r for p, r in complete.items() if p in keep}, at_reference


def check_claims(complete: dict, expected: list[Point]) -> list[dict]:
    """Each claim needs every grid point it is about to be COMPLETE; otherwise it is undetermined, and
    the numbers so far are shown anyway."""
    fid = {p: r["best_fid"] for p, r in complete.items()}
    out = []
    for number, text, about, evaluate in CLAIMS:
        relevant = [p for p in expected if about(p)]
        lacking = [p for p in relevant if p not in fid]
        try:
            holds, numbers, spread = evaluate({p: fid[p] for p in relevant if p in fid})
        except _NoData as err:
            holds, numbers, spread = None, str(err), {"exceeds_seed_spread": None, "text": "n/a"}
        if holds is None or lacking:
            verdict = UNDETERMINED
            if lacking:
                numbers = (
                    f"{len(lacking)} of {len(relevant)} needed grid points lack a COMPLETE result; so far: {numbers}"
                )
        else:
            verdict = HOLDS if holds else NOT_HOLDS
        out.append(
            {
                "claim": number,
                "text": text,
                "verdict": verdict,
                "numbers": numbers,
                "spread": spread,
                "points_needed": len(relevant),
                "points_lacking": len(lacking),
            }
        )
    return out


def _prepare(records: list[dict], study: dict):
    records = sort_records([normalize_record(r) for r in records])
    expected = grid_points(study, records)
    return (records, expected, *select_points(records, expected, extra_fields(study)))


def analyse(records: list[dict], study: dict) -> dict:
    """Everything the report says, as plain data (this is report.json, less the figure notes and files)."""
    records, expected, complete, missing, off_grid = _prepare(records, study)
    seeds = sorted({p.seed for p in complete})
    table = config_table(complete)
    fixed = study.get("fixed") or {}
    return {
        "study_name": study.get("study_name"),
        "grid": study.get("grid"),
        "fixed": fixed,
        "clip_x0": fixed.get("clip_x0"),  # None: a study from before the option (its samplers clipped)
        "protocol_changes": protocol_changes(fixed),
        "points_expected": len(expected),
        "points_complete": len(complete),
        "partial": bool(missing),
        "seeds": seeds,
        "multi_seed": len(seeds) > 1,
        "spread_method": SPREAD_METHOD,
        "configs": table,
        "best": table[0] if table else None,
        "means": group_means(complete, expected),
        "claims": check_claims(*subset) if (subset := reference_subset(complete, expected)) else [],
        "varied": [f for f in extra_fields(study) if len({dict(p.extra)[f] for p in expected}) > 1],
        "missing": missing,
        "off_grid_runs": [r["run_id"] or r["trial"] for r in off_grid],
        "time": {**time_by_phase(records), "projection": study.get("projection")},
        "pieces": study.get("pieces"),
        "merge_notes": study.get("merge_notes") or [],
        "registered_model": study.get("registered_model"),  # {name, version, champion}: read from MLflow only
    }


def protocol_changes(fixed: dict) -> dict:
    """{field: {"value", "default"}} for each protocol field (`grid.PROTOCOL_FIELDS`) the study fixed away from
    its default; a field the study did not record is not judged."""
    from mnist_diff.config import Config
    from mnist_diff.study.grid import PROTOCOL_FIELDS

    def same(a, b) -> bool:
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9)
        except (TypeError, ValueError):
            return str(a) == str(b)

    defaults = Config()
    return {
        k: {"value": fixed[k], "default": getattr(defaults, k)}
        for k in PROTOCOL_FIELDS
        if k in fixed and not same(fixed[k], getattr(defaults, k))
    }


def time_by_phase(records: list[dict]) -> dict:
    """Seconds per phase summed over every trial that recorded them, retries and failures included: where the
    study's compute went (trials of several workers overlap, so the sum exceeds the wall time)."""
    timed = [r for r in records if r["phase_seconds"]]
    sums = {
        k: sum(r["phase_seconds"].get(k, 0.0) for r in timed)
        for k in dict.fromkeys(k for r in timed for k in r["phase_seconds"])
    }
    return {"trials": len(timed), "seconds": sums}
