"""`report`: a study's findings (tables, the reference claims checked, figures), from MLflow or a results file."""

from __future__ import annotations

from pathlib import Path

import click

from mnist_diff.cli.checks import check_writable_dir, checked_tracking_uri, refuse_in_memory
from mnist_diff.cli.group import BadInput
from mnist_diff.cli.options import out_option, tracking_uri_option


@click.command()
@click.option("--study", "study_name", default=None, help="The study to report on (read from MLflow).")
@click.option(
    "--results",
    "results_paths",
    type=click.Path(exists=True),
    multiple=True,
    help="Or a grid_search_results.json written by `sweep` (or the --out folder holding it). Repeatable: pieces "
    "of one study (grid filters run apart) merge into one report; a point COMPLETE in several is taken from the "
    "first given.",
)
@click.option(
    "--storage",
    default=None,
    hidden=True,
    help="Ignored: the report reads the study's runs from MLflow (kept so old commands still parse).",
)
@tracking_uri_option
@click.option("--no-tracking", is_flag=True, help="Don't log the report to the study's parent run.")
@out_option("runs/report")
def report(study_name, results_paths, storage, tracking_uri, no_tracking, out):
    """The study's findings: tables, the reference study's claims checked, figures (report.md/html + PNGs)."""
    if (study_name is None) == (not results_paths):
        raise BadInput("give exactly one of --study and --results")
    out_path = check_writable_dir(out)
    refuse_in_memory(storage, "--storage")
    from mnist_diff.report.analysis import load_records_from_json
    from mnist_diff.report.pieces import PiecesError, merge_pieces, results_file
    from mnist_diff.report.reader import load_study_from_mlflow
    from mnist_diff.report.write import write_report
    from mnist_diff.tracking.mlflow_store import Tracker

    tracker = None
    if results_paths:
        pieces = []
        for given in results_paths:
            path = results_file(given)
            if not path.is_file():
                raise BadInput(f"--results {given}: a folder without {path.name}")
            try:
                pieces.append((given, *load_records_from_json(path)))
            except (ValueError, KeyError) as err:
                raise BadInput(f"--results {given}: not a grid_search_results.json ({err})") from None
        if len(pieces) == 1:
            _, records, study = pieces[0]
        else:
            try:
                records, study, notes = merge_pieces(pieces)
            except PiecesError as err:
                raise BadInput(str(err)) from None
            for note in notes:
                click.echo(f"note: {note}")
    else:
        uri = checked_tracking_uri(tracking_uri)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
            raise BadInput(f"no MLflow run tagged as study {study_name!r}: there is no store at {uri}")
        try:
            records, study, parent_id = load_study_from_mlflow(uri, study_name)
        except LookupError as err:
            raise BadInput(str(err).strip("'\"")) from None
        if not no_tracking:
            tracker = Tracker(uri)
            tracker.run_id = parent_id
    out_path.mkdir(parents=True, exist_ok=True)
    write_report(records, study, out_path, tracker=tracker)
    click.echo(f"report -> {out_path / 'report.md'} ({out_path / 'report.html'})")
    if tracker is not None:
        click.echo(f"logged to the study's parent run {tracker.run_id} under report/")
