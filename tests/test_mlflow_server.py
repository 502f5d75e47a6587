"""The same run sent to a real `mlflow server` on 127.0.0.1, read back with an MlflowClient."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import QUIET, free_port


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(uri + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow server did not start:\n" + Path(tmp_path / "server.log").read_text())
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_run_logged_to_a_real_server(mlflow_server, run_cli, rlhf_home):
    from mlflow import MlflowClient

    run_cli("experiment=smoke", f"logger.tracking_uri={mlflow_server}", "logger.experiment_name=server-test",
            "trainer.max_steps=20", "trainer.val_check_interval=10", *QUIET)
    assert not (rlhf_home / "mlflow.db").exists()  # nothing went to the local store

    # a client of its own: mlflow.set_tracking_uri would also set MLFLOW_TRACKING_URI for every later test, pointing
    # at a server this fixture stops
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("server-test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.max_steps"] == "20" and run.data.params["model.n_layer"] == "2"
    assert run.data.tags["stage"] == "pretrain"
    assert run.data.metrics["val/loss"] > 0 and run.data.metrics["train/tokens_per_s"] > 0
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "model", "samples.json"} <= paths
    resolved = client.download_artifacts(run.info.run_id, "config/resolved.yaml", str(rlhf_home))
    assert "max_steps: 20" in Path(resolved).read_text()
