"""Credentials in storage and tracking URLs never reach the output, the logs or MLflow."""
from click.testing import CliRunner

import cli
from mnist_diff.redact import redact_text, redact_url
from mnist_diff.tracking import ui_command


def test_redact_url():
    assert redact_url("postgresql://u:s3cr%40t@db.example:5432/optuna") == "postgresql://u:***@db.example:5432/optuna"
    assert redact_url("postgresql+psycopg2://u:pw@[::1]/x") == "postgresql+psycopg2://u:***@[::1]/x"
    assert redact_url("https://user:tok@mlflow.example/") == "https://user:***@mlflow.example/"
    for plain in ("sqlite:///optuna.db", "http://127.0.0.1:5000", "postgresql://u@h/db", None, ""):
        assert redact_url(plain) == plain  # nothing to hide (a .pgpass or PGPASSWORD holds the password)
    url = "postgresql://u:hunter2@h/db"
    assert redact_text(f"could not connect to {url}: password hunter2 rejected", url) == \
        "could not connect to postgresql://u:***@h/db: password *** rejected"
    assert "tok" not in ui_command("https://user:tok@mlflow.example")


def test_an_unreachable_storage_is_named_without_its_password(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.cli, ["sweep", "--storage", "postgresql://u:hunter2@127.0.0.1:9/optuna",
                                          "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "hunter2" not in result.output, result.output
    assert "--storage postgresql://u:***@127.0.0.1:9/optuna is unreachable" in result.output
    assert list(tmp_path.iterdir()) == []
