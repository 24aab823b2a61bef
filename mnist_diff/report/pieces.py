"""A study run in pieces (`report --results A --results B`): each piece a grid filter of one study, run in its own
folder and stores, perhaps on another machine, merged into one study whose grid is the union of theirs.

Pieces must share the protocol: every fixed setting but those that change only how fast a study runs
(`spec.RESUMABLE_FIELDS`), and the same grid dimensions. Each grid point is taken once: from the first piece
(in the order given) that holds it COMPLETE, else from the first that holds it at all; a point COMPLETE in
several pieces is said so (`notes`).
"""

from __future__ import annotations

import json
from pathlib import Path

from mnist_diff.report.analysis import extra_fields, point_of
from mnist_diff.study.spec import RESUMABLE_FIELDS

RESULTS_NAME = "grid_search_results.json"


class PiecesError(ValueError):
    """Pieces that are not parts of one study: one line naming what differs."""


def results_file(path) -> Path:
    """A results file, or the folder (a sweep's --out) that holds its grid_search_results.json."""
    path = Path(path)
    return path / RESULTS_NAME if path.is_dir() else path


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def check_protocol(first: tuple[str, dict], other: tuple[str, dict]) -> None:
    """PiecesError naming the first grid dimension or fixed setting in which `other` differs from `first`."""
    (name_a, a), (name_b, b) = first, other
    dims_a, dims_b = list(a.get("grid") or {}), list(b.get("grid") or {})
    if dims_a != dims_b:
        differ = next(d for d in [*dims_a, *dims_b] if d not in dims_a or d not in dims_b)
        raise PiecesError(
            f"{name_b} is not a piece of the study in {name_a}: grid dimension {differ!r} is in one and not the "
            f"other ({', '.join(dims_a)} vs {', '.join(dims_b)})"
        )
    fixed_a, fixed_b = a.get("fixed") or {}, b.get("fixed") or {}
    missing = object()
    for key in dict.fromkeys([*fixed_a, *fixed_b]):
        if key in RESUMABLE_FIELDS:
            continue
        va, vb = fixed_a.get(key, missing), fixed_b.get(key, missing)
        if va is missing or vb is missing or not _same(va, vb):
            show = lambda v: "not recorded" if v is missing else json.dumps(v)  # noqa: E731
            raise PiecesError(
                f"{name_b} is not a piece of the study in {name_a}: its protocol differs in {key} "
                f"({show(vb)} vs {show(va)})"
            )


def merge_pieces(pieces: list[tuple[str, list[dict], dict]]) -> tuple[list[dict], dict, list[str]]:
    """(records, study, notes) of one study made of `pieces`, each (name, records, study) as
    `analysis.load_records_from_json` returns them. PiecesError when their protocols differ."""
    first_name, _, first = pieces[0]
    for name, _, study in pieces[1:]:
        check_protocol((first_name, first), (name, study))
    grid: dict[str, list] = {}
    for _, _, study in pieces:
        for dim, values in (study.get("grid") or {}).items():
            kept = grid.setdefault(dim, [])
            kept += [v for v in values if not any(_same(v, k) for k in kept)]
    extra = extra_fields(first)
    holders: dict = {}  # point -> [(piece index, complete?)]
    for i, (_, records, _) in enumerate(pieces):
        for r in records:
            complete = r["state"] == "COMPLETE" and r["best_fid"] is not None
            holders.setdefault(point_of(r, extra), {}).setdefault(i, False)
            holders[point_of(r, extra)][i] |= complete
    chosen, notes = {}, []
    for point, by_piece in holders.items():
        done = [i for i, complete in by_piece.items() if complete]
        chosen[point] = min(done) if done else min(by_piece)
        if len(done) > 1:
            notes.append(
                f"grid point ({', '.join(f'{k}={v}' for k, v in point.as_dict().items())}) is COMPLETE in "
                f"{' and '.join(pieces[i][0] for i in sorted(done))}: {pieces[min(done)][0]}'s is kept "
                "(the first --results given)"
            )
    records = [r for i, (_, recs, _) in enumerate(pieces) for r in recs if chosen[point_of(r, extra)] == i]
    names = list(dict.fromkeys(str(s.get("study_name")) for _, _, s in pieces))
    study = {
        "study_name": " + ".join(names),
        "grid": grid,
        "grid_fields": first.get("grid_fields"),
        "fixed": first.get("fixed"),
        "projection": None,  # each piece's is for its own part and device
        "pieces": [
            {
                "results": name,
                "study_name": s.get("study_name"),
                "complete": s.get("complete"),
                "grid_size": s.get("grid_size"),
                "stopped": s.get("stopped"),
            }
            for name, _, s in pieces
        ],
        "merge_notes": notes,
    }
    return records, study, notes
