"""`report`: a synthetic study with hand-computable numbers, stored both as grid_search_results.json and as
real MLflow runs (SQLite), so the tables, the claim verdicts and the seed-spread checks can be asserted."""

import json

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from mnist_diff.report.analysis import (
    HOLDS,
    NOT_ENOUGH_SEEDS,
    NOT_HOLDS,
    UNDETERMINED,
    analyse,
    load_records_from_json,
    sign_test,
    t_interval,
)
from mnist_diff.report.reader import load_study_from_mlflow
from mnist_diff.report.render import report_blocks, to_markdown
from mnist_diff.report.write import write_report
from mnist_diff.tracking.mlflow_store import Tracker

GRID = {
    "schedule": ["linear", "cosine", "quadratic", "sigmoid"],
    "timesteps_beta_end": [[200, 0.08], [1000, 0.02]],
    "sampler": ["ddpm", "ddim"],
    "seed": [0],
}
FIXED = {"epochs": 4, "batch_size": 128, "beta_start": 0.0001}
# Best FID per (schedule, T, sampler), chosen so every mean is easy by hand:
#   by schedule   linear 20, cosine 11, quadratic 10, sigmoid 30
#   by (T, β_end) 200/0.08: 148/8 = 18.5, 1000/0.02: 136/8 = 17.0
#   by sampler    ddpm 132/8 = 16.5, ddim 152/8 = 19.0
#   best single   cosine T=200 ddim 8; best ddpm 9 (quadratic)
FID = {
    ("linear", 200, "ddpm"): 20,
    ("linear", 200, "ddim"): 24,
    ("linear", 1000, "ddpm"): 16,
    ("linear", 1000, "ddim"): 20,
    ("cosine", 200, "ddpm"): 12,
    ("cosine", 200, "ddim"): 8,
    ("cosine", 1000, "ddpm"): 10,
    ("cosine", 1000, "ddim"): 14,
    ("quadratic", 200, "ddpm"): 9,
    ("quadratic", 200, "ddim"): 11,
    ("quadratic", 1000, "ddpm"): 9,
    ("quadratic", 1000, "ddim"): 11,
    ("sigmoid", 200, "ddpm"): 30,
    ("sigmoid", 200, "ddim"): 34,
    ("sigmoid", 1000, "ddpm"): 26,
    ("sigmoid", 1000, "ddim"): 30,
}
BETA_END = {200: 0.08, 1000: 0.02, 500: 0.04}
EXPECTED_VERDICTS = [HOLDS, HOLDS, NOT_HOLDS, HOLDS, NOT_HOLDS, NOT_HOLDS]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(trial, schedule, T, sampler, fid, seed=0, state="COMPLETE", samples_dir=None, error=None):
    r = {
        "trial": trial,
        "state": state,
        "params": {"schedule": schedule, "timesteps": T, "beta_end": BETA_END[T], "sampler": sampler, "seed": seed},
        "run_id": None,
        "trained_by_run_id": None,
        "samples_dir": samples_dir,
        "error": error,
    }
    if state == "COMPLETE":  # FID falls, bottoms out at epoch 3, rises a little
        r.update(
            best_fid=fid,
            best_epoch=3,
            best_fid_select=fid + 1,
            train_seconds=100.0 + trial,
            final_sampling_seconds=20.0 if sampler == "ddpm" else 2.0,
            phase_seconds={
                "training": 100.0 + trial,
                "final_sampling": 20.0 if sampler == "ddpm" else 2.0,
                "selection_fid": 3.0,
            },
            epoch_fids={str(e): fid + d for e, d in ((1, 60), (2, 10), (3, 1), (4, 2))},
        )
    return r


def one_seed_records(samples_root=None):
    out = []
    for i, ((s, T, m), fid) in enumerate(FID.items()):
        folder = None
        if samples_root is not None and s != "sigmoid":  # sigmoid's grids are "on another machine"
            folder = samples_root / f"{s}-{T}-{m}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("L", (62, 62), color=int(fid * 7)).save(folder / "epoch-003.png")
        elif samples_root is not None:
            folder = samples_root / "elsewhere" / f"{s}-{T}-{m}"
        out.append(record(i, s, T, m, fid, samples_dir=None if folder is None else str(folder)))
    return out


def study(grid=GRID):
    return {"study_name": "s1", "grid": grid, "fixed": FIXED}


def write_json(path, records, st):
    path.write_text(json.dumps({**st, "results": records, "best": None}))
    return path


def by_claim(a):
    return [c["verdict"] for c in a["claims"]]


def test_one_seed_tables_claims_and_files(tmp_path):
    records = one_seed_records(tmp_path / "samples")
    recs, st = load_records_from_json(write_json(tmp_path / "grid_search_results.json", records, study()))
    a = write_report(recs, st, tmp_path / "report")

    means = {k: {json.dumps(g["group"]): g["mean"] for g in v["groups"]} for k, v in a["means"].items()}
    assert means["schedule"] == {'"linear"': 20, '"cosine"': 11, '"quadratic"': 10, '"sigmoid"': 30}
    assert means["timesteps_beta_end"] == {"[200, 0.08]": 18.5, "[1000, 0.02]": 17.0}
    assert means["sampler"] == {'"ddpm"': 16.5, '"ddim"': 19.0}
    assert a["means"]["schedule"]["groups"][2]["std"] == pytest.approx((4 / 3) ** 0.5)  # quadratic 9, 11, 9, 11
    best = a["best"]
    assert (best["schedule"], best["timesteps"], best["beta_end"], best["sampler"], best["best_fid_mean"]) == (
        "cosine",
        200,
        0.08,
        "ddim",
        8,
    )
    assert [r["best_fid_mean"] for r in a["configs"]] == sorted(FID.values())
    assert by_claim(a) == EXPECTED_VERDICTS
    assert all(c["spread"]["exceeds_seed_spread"] is None for c in a["claims"])
    assert all(NOT_ENOUGH_SEEDS in a["claims"][i]["spread"]["text"] for i in (0, 2, 3, 5))  # 1 seed
    assert a["points_complete"] == a["points_expected"] == 16 and not a["partial"]

    out = tmp_path / "report"
    for name in a["files"]:
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
            with Image.open(out / name) as im:
                im.verify()
    assert json.loads((out / "report.json").read_text())["claims"][2]["verdict"] == NOT_HOLDS
    md = (out / "report.md").read_text()
    assert "Complete: all 16 grid points" in md and "PARTIAL" not in md
    assert a["protocol_changes"] == {"epochs": {"value": 4, "default": 20}}  # batch 128, beta_start 1e-4: defaults
    assert "**Not the default protocol: epochs 4 (default 20).**" in md
    assert "no seed-to-seed spread can be estimated" in md and "cosine schedule ignores beta_start/beta_end" in md
    assert "x0 clipping: not recorded" in md and "DDPM-vs-DDIM comparison (claims 4 and 5)" in md
    # trial s: the trial's phases summed, 105 + 2 + 3
    assert "| cosine | 200 | 0.08 | ddim | 1 | 8.00 | 3 | 9.00 | 105 | 2.0 | 110 |" in md
    # the four sigmoid configs have no grid file here: left out of the montage, and said so
    assert len(a["montage_missing"]) == 4 and all(m.startswith("sigmoid") for m in a["montage_missing"])
    assert "Sample grids not found" in md
    html = (out / "report.html").read_text()
    assert "<table>" in html and '<img src="schedules.png"' in html


def mlflow_study(tmp_path, records, st):
    """Parent run + one child run per record, as the sweep logs them; sets each record's run_id."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sweep", artifact_location=(tmp_path / "mlruns").as_uri())
    parent = client.create_run(exp, tags={"mnist_diff.role": "study", "mnist_diff.study": st["study_name"]}).info.run_id
    client.log_dict(parent, st, "study.json")
    status = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "FAIL(KILLED)": "KILLED", "RUNNING": None}
    for r in records:
        tags = {
            "mlflow.parentRunId": parent,
            "mnist_diff.role": "trial",
            "mnist_diff.study": st["study_name"],
            "mnist_diff.trial": str(r["trial"]),
            "mnist_diff.trained_by": "trainer-run",
        }
        if r["samples_dir"]:
            tags["mnist_diff.samples_dir"] = r["samples_dir"]
        if r["error"]:  # as Tracker.end records an exception
            tags["error_type"], tags["error_message"] = r["error"].split(": ", 1)
        run_id = client.create_run(exp, tags=tags).info.run_id
        params = {**r["params"], "beta_start": 0.0001, "ddim_steps": 50, "eta": 0.0, "epochs": 4}
        metrics = [Metric("fid", v, 0, int(e)) for e, v in r.get("epoch_fids", {}).items()]
        metrics += [
            Metric(k, float(r[k]), 0, 0)
            for k in ("best_fid", "best_epoch", "best_fid_select", "train_seconds", "final_sampling_seconds")
            if k in r
        ]
        metrics += [Metric(f"seconds_{k}", v, 0, 0) for k, v in r.get("phase_seconds", {}).items()]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
        if status[r["state"]]:
            client.set_terminated(run_id, status=status[r["state"]])
        r.update(run_id=run_id, trained_by_run_id="trainer-run")
    return uri, parent


def test_mlflow_and_json_loaders_give_the_same_records(tmp_path):
    records = one_seed_records()
    # retried trials: a failed and a killed first attempt, each later finished (FINISHED wins)
    records += [
        record(16, "linear", 200, "ddpm", None, state="FAIL", error="OutOfMemoryError: CUDA out of memory"),
        record(17, "sigmoid", 1000, "ddim", None, state="FAIL(KILLED)"),
    ]
    uri, parent = mlflow_study(tmp_path, records, study())
    # a trial's run stopped before it logged its parameters (the sweep got SIGTERM as the trial started)
    client = MlflowClient(uri)
    client.create_run(
        client.get_run(parent).info.experiment_id,
        tags={
            "mlflow.parentRunId": parent,
            "mnist_diff.role": "trial",
            "mnist_diff.study": "s1",
            "mnist_diff.trial": "18",
        },
    )
    from_json, st_json = load_records_from_json(write_json(tmp_path / "r.json", records, study()))
    from_mlflow, st_mlflow, parent_id = load_study_from_mlflow(uri, "s1")
    assert parent_id == parent
    assert from_mlflow == from_json
    assert {k: st_mlflow[k] for k in ("study_name", "grid", "fixed")} == study()
    assert [r["state"] for r in from_mlflow[-2:]] == ["FAIL", "FAIL(KILLED)"]
    assert from_mlflow[0]["epoch_fids"] == {1: 80.0, 2: 30.0, 3: 21.0, 4: 22.0}
    a = analyse(from_mlflow, st_mlflow)
    assert a == analyse(from_json, st_json)
    assert a["points_complete"] == 16 and by_claim(a) == EXPECTED_VERDICTS


def two_seed_records():
    """best_fid = base[schedule] + ddim effect + (T, β_end) effect. DDIM is 5 (seed 0) or 5.4 (seed 1) worse:
    far beyond the seed spread. T=200/0.08 is 1.2 better with seed 0 and 1.0 worse with seed 1: a mean
    difference of -0.1, well within it."""
    base = {"linear": 20, "cosine": 12, "quadratic": 10, "sigmoid": 30}
    out = []
    for s in base:
        for T in (200, 1000):
            for m in ("ddpm", "ddim"):
                for seed in (0, 1):
                    fid = base[s] + (5 + 0.4 * seed if m == "ddim" else 0) + ((-1.2, 1.0)[seed] if T == 200 else 0)
                    out.append(record(len(out), s, T, m, fid, seed=seed))
    return out


def test_two_seeds_mean_std_and_not_enough_seeds_to_tell():
    a = analyse(two_seed_records(), {**study({**GRID, "seed": [0, 1]}), "fixed": {**FIXED, "clip_x0": False}})
    assert a["multi_seed"] and a["points_complete"] == 32
    best = a["best"]  # quadratic T=200 ddpm: 8.8 and 11.0
    assert (best["schedule"], best["timesteps"], best["sampler"]) == ("quadratic", 200, "ddpm")
    assert best["best_fid_mean"] == pytest.approx(9.9) and best["best_fid_std"] == pytest.approx(2.2 / 2**0.5)
    sampler = {g["group"]: g for g in a["means"]["sampler"]["groups"]}
    assert sampler["ddpm"]["mean"] == pytest.approx(17.95) and sampler["ddim"]["mean"] == pytest.approx(23.15)
    assert sampler["ddpm"]["n"] == 16

    c = {x["claim"]: x for x in a["claims"]}
    assert by_claim(a) == [HOLDS, NOT_HOLDS, HOLDS, HOLDS, HOLDS, NOT_HOLDS]
    # two seeds: the differences are computed per seed, but no verdict on the seed spread is given
    assert all(x["spread"]["exceeds_seed_spread"] is None and "ci95" not in x["spread"] for x in a["claims"])
    assert c[4]["spread"]["per_seed_diffs"] == pytest.approx([-5.0, -5.4]) and c[4]["spread"]["n_pairs"] == 16
    assert c[4]["spread"]["shared_training"] and "each pair sharing a training" in c[4]["spread"]["text"]
    assert c[3]["spread"]["per_seed_diffs"] == pytest.approx([-1.2, 1.0])
    assert c[3]["spread"]["mean_diff"] == pytest.approx(-0.1) and not c[3]["spread"]["shared_training"]
    assert c[3]["spread"]["text"].endswith(f"2 seeds, 16 pairs): {NOT_ENOUGH_SEEDS} (needs 3 seeds or more)")

    md = to_markdown(report_blocks(a, []))
    assert "| quadratic | 200 | 0.08 | ddpm | 2 | 9.90 ± 1.56 | 3, 3 |" in md
    assert "paired t-interval (95%) over seeds" in md and "paired, not independent" in md
    assert f"With 2 seeds the seed-spread column says {NOT_ENOUGH_SEEDS}" in md
    assert "exceeds seed spread" not in md and "within seed spread" not in md
    assert "x0 clipping: off (clip_x0=False)" in md and "clip_x0=False" in md


T_975 = {1: 12.706204736174698, 2: 4.302652729749464, 4: 2.7764451051977934}  # Student t 97.5% quantiles


def test_t_interval_and_sign_test_golden_values():
    # d = [1, 2, 3]: mean 2, s = 1, n = 3 -> 2 ± t(0.975, 2) / sqrt(3)
    assert t_interval([1, 2, 3]) == pytest.approx((2 - T_975[2] / 3**0.5, 2 + T_975[2] / 3**0.5))
    assert t_interval([1, 2, 3]) == pytest.approx((-0.484138, 4.484138), abs=1e-6)
    # d = [0, 2]: mean 1, s = sqrt(2), n = 2 -> 1 ± t(0.975, 1)
    assert t_interval([0, 2]) == pytest.approx((1 - T_975[1], 1 + T_975[1]))
    # d = [2, 4, 4, 5, 7]: mean 4.4, s^2 = 13.2 / 4 = 3.3
    half = T_975[4] * (3.3 / 5) ** 0.5
    assert t_interval([2, 4, 4, 5, 7]) == pytest.approx((4.4 - half, 4.4 + half))
    with pytest.raises(ValueError):
        t_interval([1.0])
    # exact two-sided sign test: p = 2 P(Bin(n, 1/2) <= min(k, n - k)), zeros dropped
    assert sign_test([1, 2, 3]) == (3, 3, 0.25)
    assert sign_test([-1, -2, -3, -4, -5, -6]) == (0, 6, 0.03125)
    assert sign_test([1, 1, 1, 1, -1, 0]) == (4, 5, pytest.approx(0.375))
    assert sign_test([1, -1]) == (1, 2, 1.0)


def three_seed_records():
    """As two_seed_records, with a third seed: DDIM is 5, 5.4 and 6.2 worse; T=200/0.08 is -1.2, +1.0, +0.5."""
    base = {"linear": 20, "cosine": 12, "quadratic": 10, "sigmoid": 30}
    ddim, short = (5.0, 5.4, 6.2), (-1.2, 1.0, 0.5)
    out = []
    for s in base:
        for T in (200, 1000):
            for m in ("ddpm", "ddim"):
                for seed in (0, 1, 2):
                    fid = base[s] + (ddim[seed] if m == "ddim" else 0) + (short[seed] if T == 200 else 0)
                    out.append(record(len(out), s, T, m, fid, seed=seed))
    return out


def test_three_seeds_paired_t_interval_over_seeds():
    a = analyse(three_seed_records(), study({**GRID, "seed": [0, 1, 2]}))
    c = {x["claim"]: x["spread"] for x in a["claims"]}
    # ddpm − ddim per seed: -5, -5.4, -6.2; mean -5.5333, s^2 = (0.5333^2 + 0.1333^2 + 0.6667^2) / 2 = 0.37333
    mean, s = -16.6 / 3, (0.746666666 / 2) ** 0.5
    half = T_975[2] * s / 3**0.5
    assert c[4]["per_seed_diffs"] == pytest.approx([-5.0, -5.4, -6.2]) and c[4]["n_seeds"] == 3
    assert c[4]["ci95"] == pytest.approx([mean - half, mean + half])
    assert c[4]["ci95"] == pytest.approx([-7.05117, -4.01550], abs=1e-4)
    assert c[4]["exceeds_seed_spread"] is True and c[4]["n_pairs"] == 24
    assert c[4]["sign_test"] == {"positive": 0, "n": 3, "p": 0.25}
    assert (
        "paired 95% t-interval [-7.05, -4.02] over 3 seeds (24 pairs, each pair sharing a training)" in c[4]["text"]
        and "p = 0.25: exceeds seed spread" in c[4]["text"]
    )
    # (T=200) − (T=1000) per seed: -1.2, 1.0, 0.5: mean 0.1, within the spread
    assert c[3]["per_seed_diffs"] == pytest.approx([-1.2, 1.0, 0.5]) and c[3]["exceeds_seed_spread"] is False
    lo, hi = c[3]["ci95"]
    assert lo < 0 < hi and (lo + hi) / 2 == pytest.approx(0.1)
    assert c[1]["exceeds_seed_spread"] is True  # quadratic − cosine = -2 in every pair of every seed
    md = to_markdown(report_blocks(a, []))
    assert md.count(NOT_ENOUGH_SEEDS) == 1  # in the method's description only
    assert "exceeds seed spread" in md and "within seed spread" in md


def test_partial_study(tmp_path):
    grid = {**GRID, "timesteps_beta_end": [[200, 0.08], [1000, 0.02], [500, 0.04]]}
    records = one_seed_records() + [
        record(20, "linear", 500, "ddpm", 15),
        record(21, "linear", 500, "ddim", None, state="FAIL", error="RuntimeError: NaN loss\nTraceback ..."),
        record(22, "cosine", 500, "ddpm", None, state="RUNNING"),
        record(23, "cosine", 500, "ddim", None, state="FAIL"),
        record(24, "cosine", 500, "ddim", 13),
        record(25, "quadratic", 500, "ddpm", 12),
    ]
    a = write_report(records, study(grid), tmp_path)
    assert a["partial"] and (a["points_complete"], a["points_expected"]) == (19, 24)
    missing = {
        (m["point"]["schedule"], m["point"]["timesteps"], m["point"]["sampler"]): m["state"] for m in a["missing"]
    }
    assert missing == {
        ("linear", 500, "ddim"): "FAIL",
        ("cosine", 500, "ddpm"): "RUNNING",
        ("quadratic", 500, "ddim"): "MISSING",
        ("sigmoid", 500, "ddpm"): "MISSING",
        ("sigmoid", 500, "ddim"): "MISSING",
    }
    # claim 3 only needs the T=200 and T=1000 points, which are all there; the others need T=500 too
    assert by_claim(a) == [UNDETERMINED, UNDETERMINED, NOT_HOLDS, UNDETERMINED, UNDETERMINED, UNDETERMINED]
    assert "5 of 24 needed grid points" in a["claims"][0]["numbers"]
    md = (tmp_path / "report.md").read_text()
    assert "PARTIAL: 19 of 24 grid points complete" in md
    assert "- cosine, T=500, β_end=0.04, ddpm, seed 0: RUNNING (trial 22)" in md
    assert "- sigmoid, T=500, β_end=0.04, ddim, seed 0: MISSING" in md
    assert "- linear, T=500, β_end=0.04, ddim, seed 0: FAIL (trial 21): RuntimeError: NaN loss\n" in md
    assert "montage" in md and len(a["montage_missing"]) == 19  # no samples_dir anywhere
    with Image.open(tmp_path / "samples_montage.png") as im:
        im.verify()


def test_tracker_logs_report_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # wherever MLflow puts artifacts by default, it is inside tmp_path
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp")
    tracker.start()
    a = write_report(one_seed_records(), study(), tmp_path / "out", tracker=tracker)
    logged = {f.path for f in tracker.client.list_artifacts(tracker.run_id, "report")}
    assert logged == {f"report/{name}" for name in a["files"]}


def test_a_grid_holding_the_reference_grid_checks_the_claims_at_the_reference_values():
    """Reference grid x eta {0, 0.5}: the claims use the eta = 0 points (the reference study's value) only,
    so they come out as on the reference grid, while the tables group by eta too."""
    recs = []
    for i, r in enumerate(one_seed_records()):
        for eta, shift in ((0.0, 0), (0.5, 100)):  # eta = 0.5 much worse, and would flip claims if mixed in
            recs.append(
                {
                    **r,
                    "trial": 2 * i + (eta > 0),
                    "params": {**r["params"], "eta": eta},
                    "best_fid": r["best_fid"] + shift * (r["params"]["schedule"] == "linear"),
                }
            )
    grid = {
        "schedule": GRID["schedule"],
        "timesteps_beta_end": GRID["timesteps_beta_end"],
        "sampler": GRID["sampler"],
        "eta": [0.0, 0.5],
        "seed": [0],
    }
    a = analyse(recs, {**study(grid), "grid_fields": {"timesteps_beta_end": ["timesteps", "beta_end"]}})
    assert a["points_expected"] == 32 and a["points_complete"] == 32 and a["varied"] == ["eta"]
    assert by_claim(a) == EXPECTED_VERDICTS
    eta = {g["group"]: g for g in a["means"]["eta"]["groups"]}
    assert eta[0.5]["mean"] - eta[0.0]["mean"] == pytest.approx(100 * 4 / 16)  # linear's 4 configs of 16
    assert eta[0.0]["vs_best"]["text"] == "best" and eta[0.5]["vs_best"]["n_pairs"] == 16
    text = to_markdown(report_blocks(a, []))
    assert "Checked on the points where eta takes the reference study's value (the default)" in text
    # without the eta = 0 points the grid no longer holds the reference grid: no claims
    a = analyse([r for r in recs if r["params"]["eta"] == 0.5], {**study({**grid, "eta": [0.5]}), "grid_fields": {}})
    assert a["claims"] == []


def test_a_protocol_chosen_by_the_time_budget_is_said_so():
    fixed = {**FIXED, "epochs": 20, "fid_select_samples": 1000, "time_budget": 1500.0}
    md = to_markdown(report_blocks(analyse(one_seed_records(), {**study(), "fixed": fixed}), []))
    assert (
        "**Not the default protocol: fid_select_samples 1000 (default 2000).**" in md
        and "`sweep --time-budget 25 min 00 s` chose it." in md
    )
    assert "chose it" not in to_markdown(report_blocks(analyse(one_seed_records(), study()), []))
