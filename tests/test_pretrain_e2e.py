"""Stage 1 end to end through the real CLI: train, export, reload with plain transformers, MLflow contents, resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QUIET, REPO, cli_env, exported_dir, mlflow_runs


def test_pretrain_smoke_trains_exports_and_tracks(run_cli, rlhf_home):
    proc = run_cli("stage=pretrain", "experiment=smoke", *QUIET)
    model_dir = exported_dir(proc.stdout)
    assert f"sqlite:///{rlhf_home.resolve()}/mlflow.db" in proc.stdout  # the store is printed

    # plain transformers loads the artifact, and it generates decodable text
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.pad_token_id != tok.eos_token_id and tok.chat_template
    assert model.generation_config.pad_token_id == tok.pad_token_id
    ids = tok("Hello, how are", return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**ids, max_new_tokens=8, do_sample=True)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0]), str)

    client, runs = mlflow_runs(rlhf_home)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    val = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val/loss"), key=lambda m: m.step)]
    assert val[0] > 5.0 and val[-1] < 0.7 * val[0], val  # fell by at least 30% from the untrained start
    for key in ("train/loss", "train/tokens_per_s", "lr", "val/perplexity"):
        assert key in run.data.metrics, key
    assert run.data.params["model.n_layer"] == "2" and run.data.params["stage.name"] == "pretrain"
    assert run.data.tags["plugin.dataset"] == "plugins.datasets.chitchat.ChitchatCorpus"
    assert run.data.tags["stage"] == "pretrain"
    assert "git_commit" in run.data.tags
    paths = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "model", "samples.json"} <= paths
    assert "model/config.json" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    # continuing from the export: model.path loads it and its own tokenizer; training starts where it stopped
    proc = run_cli("experiment=smoke", f"model.path={model_dir}", "trainer.max_steps=10", "trainer.val_check_interval=5",
                   *QUIET)
    client, runs = mlflow_runs(rlhf_home)
    cont = client.get_metric_history(runs[0].info.run_id, "val/loss")
    start = min(cont, key=lambda m: m.step).value
    assert abs(start - val[-1]) < 0.05, (start, val[-1])

    table = json.loads(Path(client.download_artifacts(run.info.run_id, "samples.json", str(rlhf_home))).read_text())
    assert table["columns"] == ["prompt", "completion"] and len(table["data"]) == 3


def test_interrupted_run_resumes_into_the_same_mlflow_run(rlhf_home, tokenizer_cache, run_cli):
    # start a long run, interrupt it after the first checkpoint, then `resume=true`
    cmd = [sys.executable, "-m", "framework", "experiment=smoke", "trainer.max_steps=100000",
           "stage.checkpoint_every_n_steps=20", "trainer.val_check_interval=20", *QUIET]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(rlhf_home, tokenizer_cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(rlhf_home.glob("runs/**/checkpoints/step*.ckpt")):
        time.sleep(0.5)
    assert list(rlhf_home.glob("runs/**/checkpoints/step*.ckpt")), "no checkpoint written"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:]
    assert "did not finish" in out and "resume=true" in out
    # the first Ctrl-C is honoured at a batch boundary, never inside a tracking-store write
    assert "stopping at the end of this batch" in out and "could not mark" not in out, out[-2000:]
    assert list(rlhf_home.glob("runs/**/checkpoints/on_exception.ckpt")), out[-2000:]
    client, runs = mlflow_runs(rlhf_home)
    assert runs[0].info.status == "KILLED"
    run_id = runs[0].info.run_id
    steps_before = max(m.step for m in client.get_metric_history(run_id, "train/loss"))

    resumed = run_cli("experiment=smoke", "resume=true", "trainer.max_steps=60", "stage.checkpoint_every_n_steps=20",
                      "trainer.val_check_interval=20", *QUIET)
    assert "resuming from" in resumed.stdout and run_id in resumed.stdout
    client, runs = mlflow_runs(rlhf_home)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # same run, continued
    history = client.get_metric_history(run_id, "train/loss")
    assert max(m.step for m in history) >= 55 > steps_before or steps_before >= 55
    assert runs[0].data.tags.get("resume.changed.trainer.max_steps") == "60"
    assert "settings that differ from its first attempt" in resumed.stdout
    assert "trainer.max_steps 100000 -> 60" in resumed.stdout
    exported_dir(resumed.stdout)


@pytest.mark.slow  # the default suite's DDP runs of the other stages check the same tracking (one run, rank-0 export)
def test_ddp_strategy_on_cpu_is_one_tracked_run(run_cli, rlhf_home):
    """`trainer=ddp`: Lightning starts a second process (gloo); rank 0 alone writes the MLflow run and the export."""
    proc = run_cli("experiment=smoke", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                   "trainer.max_steps=10", "trainer.val_check_interval=5", "stage.checkpoint_every_n_steps=5", *QUIET,
                   env={"OMP_NUM_THREADS": "1"})
    model_dir = exported_dir(proc.stdout)
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.n_layer == 2
    client, runs = mlflow_runs(rlhf_home)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["trainer.strategy"] == "ddp"
    assert max(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")) >= 5
