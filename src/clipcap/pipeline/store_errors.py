"""A tracking store another process holds locked, as one line naming the database and what to do.

A sqlite MLflow store takes one writer at a time; past sqlite's wait SQLAlchemy raises an
``OperationalError`` ("database is locked") that MLflow may wrap. :func:`store_errors` turns it, wherever
it sits in the exception chain, into :class:`TrackingStoreLocked`; other errors pass unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from clipcap.errors import ClipcapError

LOCKED = ("database is locked", "database table is locked")  # sqlite's words, through SQLAlchemy and MLflow


class TrackingStoreLocked(ClipcapError):
    """The tracking database is locked by another process beyond sqlite's wait."""


def locked_store(err: BaseException, tracking_uri: str) -> TrackingStoreLocked | None:
    """The one-line error for ``err`` when it (or an error it was raised from) says the database is
    locked; None for any other error."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if any(words in str(cause) for words in LOCKED):
            break
        cause = cause.__cause__ or cause.__context__
    else:
        return None
    if not tracking_uri.startswith("sqlite:"):
        return TrackingStoreLocked(
            f"the database behind the MLflow tracking server {tracking_uri} is locked by another writer; wait and run "
            "again (a server on sqlite takes one writer at a time: give it a PostgreSQL or MySQL database)")
    database = tracking_uri.removeprefix("sqlite:///").split("?")[0]
    return TrackingStoreLocked(
        f"the MLflow tracking database {database} is locked: another clipcap or mlflow process (a stage, 'mlflow ui' "
        "or 'mlflow server') is writing it; wait for it to finish and run again, or let one tracking server own the "
        "database (bash scripts/stack.sh start; eval \"$(bash scripts/stack.sh env)\" sets MLFLOW_TRACKING_URI)")


@contextmanager
def store_errors(tracking_uri: str) -> Iterator[None]:
    """Turn a locked tracking database met inside the block into :class:`TrackingStoreLocked`."""
    try:
        yield
    except TrackingStoreLocked:
        raise
    except Exception as err:  # SQLAlchemy's OperationalError, or MLflow's exception wrapping it
        locked = locked_store(err, tracking_uri)
        if locked is None:
            raise
        raise locked from err
