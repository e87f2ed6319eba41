"""A tracking database another process holds locked: the commands that open it say so in one line
naming the database and what to do, instead of SQLAlchemy's traceback (a real sqlite file, held by
``BEGIN EXCLUSIVE`` from another connection)."""

from __future__ import annotations

import sqlite3

import pytest
import yaml

from clipcap.cli import main
from clipcap.config import RegisterConfig
from clipcap.pipeline.registry import connect
from clipcap.pipeline.store_errors import TrackingStoreLocked, store_errors


@pytest.fixture
def held(tmp_path):
    """A sqlite database another connection holds an exclusive lock on; its tracking URI waits 0.2 s
    for the lock (sqlite's default wait is 5 s)."""
    db = tmp_path / "mlflow.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE other_writer (x)")
    holder.execute("BEGIN EXCLUSIVE")
    yield db, f"sqlite:///{db}?timeout=0.2"
    holder.execute("ROLLBACK")
    holder.close()


def test_opening_a_locked_tracking_database_is_one_line_naming_it(held):
    db, uri = held
    with pytest.raises(TrackingStoreLocked) as err:
        connect(RegisterConfig(tracking_uri=uri))
    message = str(err.value)
    assert message.startswith(f"the MLflow tracking database {db} is locked: another clipcap or mlflow process")
    assert "wait for it to finish and run again, or let one tracking server own the database" in message
    assert "\n" not in message


def test_the_cli_prints_it_as_one_line(held, tmp_path, monkeypatch, capsys):
    db, uri = held
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"register": {"tracking_uri": uri}, "datasets": {"mine": {}}}))
    monkeypatch.chdir(tmp_path)
    assert main(["models", "list", "mine"]) == 1
    printed = capsys.readouterr().err
    assert "Traceback" not in printed
    assert [line for line in printed.splitlines() if "error" in line] == [
        f"clipcap models: error: the MLflow tracking database {db} is locked: another clipcap or mlflow process (a "
        "stage, 'mlflow ui' or 'mlflow server') is writing it; wait for it to finish and run again, or let one "
        "tracking server own the database (bash scripts/stack.sh start; eval \"$(bash scripts/stack.sh env)\" sets "
        "MLFLOW_TRACKING_URI)"]


def test_other_store_errors_pass_through():
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        with store_errors("sqlite:///x.db"):
            raise sqlite3.OperationalError("no such table: runs")


def test_a_lock_met_after_the_store_was_opened_is_one_line_too(tmp_path, monkeypatch, capsys):
    """Inside a registry operation (not where the store is opened): the CLI still prints one line."""
    import sqlalchemy.exc

    from clipcap.pipeline import models

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"register": {"tracking_uri": uri}, "datasets": {"mine": {}}}))
    monkeypatch.chdir(tmp_path)

    def locked(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("UPDATE registered_models", {}, sqlite3.OperationalError(
            "database is locked"))

    monkeypatch.setattr(models, "list_versions", locked)
    assert main(["models", "list", "mine"]) == 1
    printed = capsys.readouterr().err
    assert "Traceback" not in printed and len(printed.strip().splitlines()) == 1
    assert printed.startswith(f"clipcap models: error: the MLflow tracking database {tmp_path / 'mlflow.db'} is locked")
    monkeypatch.setattr(models, "list_versions", lambda *a, **k: 1 / 0)   # any other error is not hidden
    with pytest.raises(ZeroDivisionError):
        main(["models", "list", "mine"])
