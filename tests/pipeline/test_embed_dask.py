"""Embedding fanned out on a Dask cluster (flows/parts.py on prefect-dask's DaskTaskRunner): a
scheduler and two workers as processes of their own on 127.0.0.1, talking TCP as across machines. One
worker is killed while it encodes its part: the flow still completes, the part runs again on the other
worker, and the store holds every image with the single-process run's vector (to rounding)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch

from clipcap.modeling.encoders import encoder_key
from clipcap.pipeline.embedding_store import EmbeddingStore
from projects import ROOT, new_project, run

pytestmark = pytest.mark.pipeline


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process(args: list[str], log) -> subprocess.Popen:
    # the flows folder on the path, as a worker machine has it: tasks are pickled by module name
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT / "flows"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def test_a_worker_killed_mid_part_costs_only_its_part(tmp_path):
    from distributed import Client
    from prefect.testing.utilities import prefect_test_harness

    sys.path.insert(0, str(ROOT / "flows"))
    from parts import on_cluster

    project = new_project(tmp_path / "cluster", {"tuxpaint": {}})
    run(["dvc", "repro", "validate@tuxpaint"], project)
    single = tmp_path / "single"
    shutil.copytree(project, single)
    address = f"tcp://127.0.0.1:{_free_port()}"
    log = (tmp_path / "dask.log").open("w")
    processes = [_process([shutil.which("dask"), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                           "--no-dashboard"], log)]
    try:
        with Client(address, timeout=120) as client:
            workers = {f"worker-{n}": _process([shutil.which("dask"), "worker", address, "--nthreads", "1",
                                                "--no-nanny", "--no-dashboard", "--name", f"worker-{n}"], log)
                       for n in (1, 2)}   # without a nanny: the worker is this process, and a killed one stays dead
            processes += workers.values()
            client.wait_for_workers(2, timeout=120)
            killed: dict[str, int] = {}

            def kill_the_first_busy_worker() -> None:
                while not killed:
                    busy = [worker for worker, keys in client.processing().items() if keys]
                    if busy:
                        victim = workers[client.scheduler_info()["workers"][busy[0]]["name"]]
                        victim.send_signal(signal.SIGKILL)
                        killed["pid"] = victim.pid
                    time.sleep(0.1)

            threading.Thread(target=kill_the_first_busy_worker, daemon=True).start()
            with prefect_test_harness(server_startup_timeout=120):
                parts = on_cluster(address)(str(project), "tuxpaint", 2)
    finally:
        for process in processes:
            process.kill()
        log.close()
    assert killed, "no worker was killed"
    assert sorted(p["part"] for p in parts) == ["1/2", "2/2"]
    assert all(p["pid"] != killed["pid"] for p in parts), parts   # the killed part ran again elsewhere
    assert all(p["encoded"] > 0 for p in parts), parts               # and encoded what its first try lost

    out = run(["dvc", "repro", "embed@tuxpaint"], project)   # the stage: nothing left to encode
    manifest = pd.read_parquet(project / "artifacts" / "tuxpaint" / "manifest.parquet")
    assert f"{len(manifest)} already embedded" in out and "0 to encode" in out, out
    run(["dvc", "repro", "embed@tuxpaint"], single)
    key = encoder_key("efficientnet-lite0")
    stores = [EmbeddingStore(p / "artifacts" / "tuxpaint" / "embeddings", key) for p in (project, single)]
    ids = manifest["image_id"].tolist()
    torch.testing.assert_close(stores[0].get(ids), stores[1].get(ids), rtol=1e-5, atol=1e-6)
