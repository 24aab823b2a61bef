"""Credentials in storage and tracking URLs never reach the output, the logs or MLflow."""

import logging

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

import cli
from mnist_diff.tracking.mlflow_store import Tracker, ui_command
from mnist_diff.util.redact import RedactingFormatter, redact_text, redact_url


def test_redact_url():
    assert redact_url("postgresql://u:s3cr%40t@db.example:5432/optuna") == "postgresql://u:***@db.example:5432/optuna"
    assert redact_url("postgresql+psycopg2://u:pw@[::1]/x") == "postgresql+psycopg2://u:***@[::1]/x"
    assert redact_url("https://user:tok@mlflow.example/") == "https://user:***@mlflow.example/"
    for plain in ("sqlite:///optuna.db", "http://127.0.0.1:5000", "postgresql://u@h/db", None, ""):
        assert redact_url(plain) == plain  # nothing to hide (a .pgpass or PGPASSWORD holds the password)
    url = "postgresql://u:hunter2@h/db"
    assert (
        redact_text(f"could not connect to {url}: password hunter2 rejected", url)
        == "could not connect to postgresql://u:***@h/db: password *** rejected"
    )
    assert "tok" not in ui_command("https://user:tok@mlflow.example")


def test_an_unreachable_storage_is_named_without_its_password(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli.cli, ["sweep", "--storage", "postgresql://u:hunter2@127.0.0.1:9/optuna", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "hunter2" not in result.output, result.output
    assert "--storage postgresql://u:***@127.0.0.1:9/optuna is unreachable" in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_url_no_parser_reads_is_masked_too():
    """A mistyped URL is where a parser finds no password: mask any user:password@ after a scheme."""
    for typed in (
        "postgresql:/alice:hunter2@db/x",
        "postgres:alice:hunter2@db/x",
        "postgresql://alice:hun@ter2@db/x",
        "http://alice:hunter2@[::1/x",
        "mysql:///alice:hunter2@db",
    ):
        assert "hunter2" not in redact_url(typed) and "ter2" not in redact_url(typed), typed
    text = "Could not parse SQLAlchemy URL from string 'postgresql:/alice:hunter2@db/x' (at 12:30)"
    assert redact_text(text) == "Could not parse SQLAlchemy URL from string 'postgresql:/alice:***@db/x' (at 12:30)"


@pytest.mark.parametrize(
    "args",
    [
        ["report", "--study", "s", "--tracking-uri", "http://alice:hunter2@127.0.0.1:9"],
        ["sweep", "--storage", "postgresql:/alice:hunter2@127.0.0.1:9/optuna"],  # mistyped: no '//'
    ],
)
def test_no_command_prints_a_password(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    # restored after the test: a server URL's credentials go there
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "")
    result = CliRunner().invoke(cli.cli, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "hunter2" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == [], result.output


def test_records_and_log_lines_hold_no_password(tmp_path):
    """An error quoted in a run's tags (a driver's message may quote a URL), and the study's training.log."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "e")
    tracker.start()
    tracker.end("FAILED", RuntimeError("cannot reach postgresql:/alice:hunter2@db/x"))
    assert (
        MlflowClient(uri).get_run(tracker.run_id).data.tags["error_message"]
        == "cannot reach postgresql:/alice:***@db/x"
    )
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "trial failed: %s", ("http://a:hunter2@h/",), None)
    assert RedactingFormatter("%(message)s").format(record) == "trial failed: http://a:***@h/"
