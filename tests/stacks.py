"""The team stack (scripts/stack.sh) as the scenario test, the stack test and benchmarks/loop_load.py
drive it: its processes on free ports, its environment, and what they ask its Prefect API (every request
timed, none retried) and its MLflow registry."""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from projects import ROOT, run

TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class Stack:
    """The processes scripts/stack.sh starts for ``project`` (state in ``state``), and what the caller asks
    them. ``settings``: more of stack.sh's environment settings (CLIPCAP_PREFECT_WORKERS, ...)."""

    def __init__(self, project: Path, state: Path, **settings: str):
        self.project, self.state = project, state
        self.env = os.environ | {"CLIPCAP_STACK_DIR": str(state), "CLIPCAP_PREFECT_PORT": str(free_port()),
                                 "CLIPCAP_MLFLOW_PORT": str(free_port()), "CLIPCAP_PG_PORT": str(free_port()),
                                 "CLIPCAP_DASK_PORT": str(free_port())} | settings
        for line in run(["bash", str(ROOT / "scripts" / "stack.sh"), "env"], project, self.env).splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            self.env[key] = value
        self.env["PREFECT_HOME"] = str(state / "prefect")
        self.api = httpx.Client(base_url=self.env["PREFECT_API_URL"], timeout=30)
        self.mlflow = MlflowClient(self.env["MLFLOW_TRACKING_URI"])
        self.latencies_ms: list[float] = []   # of every Prefect API request made here

    def stack(self, *args: str) -> str:
        return run(["bash", str(ROOT / "scripts" / "stack.sh"), *args, "--project", str(self.project)], self.project,
                   self.env)

    def clipcap(self, *args: str) -> str:
        return run([str(self.project / "scripts" / "bin" / "clipcap"), *args], self.project, self.env)

    def call(self, method: str, path: str, **options) -> httpx.Response:
        """One Prefect API request, timed; any error fails the caller (no retry: on PostgreSQL the server
        does not answer 503 under load, as it did on SQLite with two test runs on 2 cores)."""
        started = time.perf_counter()
        response = self.api.request(method, path, **options)
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        return response

    def deployment(self, dataset: str) -> dict:
        return self.call("GET", f"/deployments/name/clipcap-retrain/retrain-{dataset}").json()

    def runs(self, dataset: str, states: tuple[str, ...] = ("RUNNING", *TERMINAL)) -> list[dict]:
        """The deployment's flow runs in ``states`` (default: started), oldest first."""
        body = {"deployments": {"id": {"any_": [self.deployment(dataset)["id"]]}},
                "flow_runs": {"state": {"type": {"any_": list(states)}}}, "sort": "START_TIME_ASC"}
        return self.call("POST", "/flow_runs/filter", json=body).json()

    def report(self, flow_run: dict) -> dict | None:
        """The markdown artifact the run published."""
        found = self.call("POST", "/artifacts/filter", json={"flow_runs": {"id": {"any_": [flow_run["id"]]}}}).json()
        return found[0] if found else None

    def wait_for_run(self, dataset: str, done, timeout: float, after: datetime | None = None) -> tuple[dict, dict]:
        """The first completed run (started after ``after``) whose artifact satisfies ``done``; fails on a
        failed run or at ``timeout``, with the workers' logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for flow_run in self.runs(dataset):
                if after and flow_run["start_time"] and parse_time(flow_run["start_time"]) < after:
                    continue
                state = flow_run["state_type"]
                assert state not in ("FAILED", "CRASHED"), f"{flow_run['name']} {state}:\n{self.worker_log()}"
                report = self.report(flow_run) if state == "COMPLETED" else None
                if report and done(report):
                    return flow_run, report
            time.sleep(5)
        pytest.fail(f"no matching run of {dataset} within {timeout:.0f} s:\n{self.worker_log()}")

    def worker_log(self) -> str:
        """The end of each Prefect worker's log (what its flow runs printed)."""
        return "\n".join(f"--- {path.name}\n" + path.read_text()[-3000:]
                         for path in sorted(self.state.glob("prefect-worker-*.log")))

    def champion(self, dataset: str) -> int:
        return int(self.mlflow.get_model_version_by_alias(f"clipcap-{dataset}", "champion").version)

    def versions(self, dataset: str) -> list[int]:
        return sorted(int(v.version) for v in self.mlflow.search_model_versions(f"name='clipcap-{dataset}'"))
