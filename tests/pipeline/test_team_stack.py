"""The team stack (scripts/stack.sh): a PostgreSQL server of its own under the Prefect server and the MLflow
tracking server, run as the `postgres` user when the script runs as root (as in CI), a Dask scheduler with
two workers, and two Prefect workers on the stack's work pool; `stop` ends every process it started (checked
by PID), a second `start` finds the registry and the deployments where they were."""

from __future__ import annotations

import os
import re
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from projects import ROOT, new_project, run
from stacks import Stack

pytestmark = pytest.mark.pipeline


def _sql(project: Path, env: dict, database: str, query: str) -> list[str]:
    """Rows of ``query`` on one of the stack's PostgreSQL databases (``stack.sh psql``: a client over TCP)."""
    return run(["bash", str(ROOT / "scripts" / "stack.sh"), "psql", "--project", str(project), "--",
                "-d", database, "-tAc", query], project, env).split()


def _pids(status: str) -> dict[str, int]:
    """Each running process of ``stack.sh status`` and its PID."""
    return {name: int(pid) for name, pid in re.findall(r"^(\S+): running \(pid (\d+)", status, re.MULTILINE)}


def _alive(pid: int, group: bool = False) -> bool:
    """Whether process ``pid`` runs; with ``group``, whether any process is left in the group it leads (each
    process the stack launches starts its own)."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_stack_keeps_its_registry_and_deployments_in_postgres_across_a_restart(tmp_path):
    project = new_project(tmp_path / "project", {"tuxpaint": {}})
    (project / "flows").symlink_to(ROOT / "flows")
    state = tmp_path / "stack"
    env = Stack(project, state).env
    stack = ["bash", str(ROOT / "scripts" / "stack.sh")]
    started = run([*stack, "start", "--project", str(project)], project, env)
    try:
        assert "stores: postgres" in started and "(2 workers)" in started
        assert "work pool clipcap, 2 workers" in started, started
        pids = _pids(run([*stack, "status", "--project", str(project)], project, env))
        assert set(pids) == {"postgres", "prefect-server", "mlflow-server", "dask-scheduler", "dask-worker-1",
                             "dask-worker-2", "prefect-worker-1", "prefect-worker-2"}, pids
        assert all(_alive(pid) for pid in pids.values()), pids
        assert httpx.get(env["PREFECT_API_URL"] + "/health", timeout=10).json() is True
        assert _sql(project, env, "prefect", "select name from deployment") == ["retrain-tuxpaint"]
        assert _sql(project, env, "prefect", "select name from work_pool where type = 'process'") == ["clipcap"]
        assert sorted(_sql(project, env, "prefect", "select name from worker where status = 'ONLINE'")) == [
            "prefect-worker-1", "prefect-worker-2"]
        MlflowClient(env["MLFLOW_TRACKING_URI"]).create_registered_model("clipcap-stack-check")
        assert _sql(project, env, "mlflow", "select name from registered_models") == ["clipcap-stack-check"]
        stopped = run([*stack, "stop", "--project", str(project)], project, env)
        assert "postgres: stopped" in stopped and "prefect-server: stopped" in stopped, stopped
        assert "running" not in run([*stack, "status", "--project", str(project)], project, env)
        left = {name: pid for name, pid in pids.items()
                if _alive(pid) or (name != "postgres" and _alive(pid, group=True))}
        assert not left, f"still running after stop: {left}"
        with pytest.raises(httpx.ConnectError):
            httpx.get(env["PREFECT_API_URL"] + "/health", timeout=5)
        run([*stack, "start", "--project", str(project)], project, env)
        assert MlflowClient(env["MLFLOW_TRACKING_URI"]).get_registered_model("clipcap-stack-check").name
        assert _sql(project, env, "prefect", "select count(*) from deployment") == ["1"]
    finally:
        run([*stack, "destroy", "--project", str(project)], project, env)   # its databases too (maybe in /var/tmp)
    assert not state.exists()
