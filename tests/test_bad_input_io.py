"""Bad input at the edges: MLflow tracking URIs, a tracking server that goes away mid-run, JSONL files with a byte
order mark or holding one JSON array, and a paths.cache_dir that is a file. Each is one `error: ...` line."""

import codecs
import json

import pytest
from omegaconf import OmegaConf

from conftest import free_port
from framework.errors import ConfigError, DataError, TrackingError
from framework.tracking import TrackedRun, check_tracking_uri, default_tracking_uri, open_run

# ---------------------------------------------------------------------------------------------- tracking URIs

BAD_URIS = [
    ("file:///tmp/rlhf-test/mlruns", "retired file store"),
    ("/tmp/rlhf-test/plainpath", "retired file store"),
    ("htp://host:5000", r"unknown scheme 'htp:' \(did you mean http://\?\)"),
    ("http://localhost:abc", "is not a valid URL"),
    ("http:///path-only", "names no host"),
]


@pytest.mark.parametrize("uri, problem", BAD_URIS)
def test_a_bad_tracking_uri_is_a_config_error_naming_the_key_and_the_accepted_forms(tmp_path, uri, problem):
    cfg = OmegaConf.create({"tracking_uri": uri, "fallback_to_local": True, "connect_timeout_s": 1})
    with pytest.raises(ConfigError, match=problem) as info:  # fallback_to_local is for a server down, not a typo
        open_run(cfg, tmp_path, "r", {"stage": "t"})
    message = str(info.value)
    assert f"logger.tracking_uri={uri!r}" in message and "http(s)://host:port" in message
    assert default_tracking_uri(tmp_path) in message and "logger.tracking_uri=null" in message
    assert not (tmp_path / "mlflow.db").exists()


def test_a_plain_path_is_answered_with_the_sqlite_uri_for_that_folder(tmp_path):
    with pytest.raises(ConfigError, match=f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db for a database"):
        check_tracking_uri(str(tmp_path / "mlruns"), tmp_path)


def test_a_uri_from_the_environment_says_so(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htp://host:5000")
    with pytest.raises(ConfigError, match=r"\(from \$MLFLOW_TRACKING_URI\)"):
        check_tracking_uri("htp://host:5000")


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://mlflow.example.com", "sqlite:///x/mlflow.db",
                                 "postgresql+psycopg2://user@host/db", "databricks"])
def test_good_tracking_uris_pass(uri):
    assert check_tracking_uri(uri) == uri


def test_an_upper_case_scheme_and_a_plugin_store_pass(monkeypatch):
    import importlib.metadata

    from framework import tracking

    assert check_tracking_uri("HTTP://127.0.0.1:5000") == "http://127.0.0.1:5000"  # then checked as a server
    real = importlib.metadata.entry_points

    def with_plugin(group=None, **kw):
        if group == "mlflow.tracking_store":
            return [importlib.metadata.EntryPoint("azureml", "azureml.mlflow:Store", group)]
        return real(group=group, **kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", with_plugin)
    assert "azureml" in tracking.store_schemes()
    assert check_tracking_uri("azureml://region.api.azureml.ms/mlflow/v1.0/x") == \
        "azureml://region.api.azureml.ms/mlflow/v1.0/x"


def test_the_file_store_passes_when_mlflow_is_told_to_allow_it(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking_uri(str(tmp_path / "mlruns"))


@pytest.mark.parametrize("uri", ["htp://host:5000", "http://localhost:abc"])
def test_cli_names_a_bad_tracking_uri_before_training(run_cli_here, rlhf_home, uri):
    proc = run_cli_here("experiment=smoke", f"logger.tracking_uri={uri}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"error: logger.tracking_uri={uri!r}" in proc.stderr
    assert not list(rlhf_home.glob("runs/**/checkpoints")) and not (rlhf_home / "mlflow.db").exists()


# ------------------------------------------------------------------------------- a server that stops answering


@pytest.fixture
def dead_server(monkeypatch, tmp_path):
    """A TrackedRun on an http store where nothing listens (the server went away), its pointer written in
    tmp_path/run; MLflow does not retry, and Lightning's logger does not set mlflow's global tracking URI."""
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: None)
    uri = f"http://127.0.0.1:{free_port()}"
    run = TrackedRun(MlflowClient(tracking_uri=uri), "0123456789abcdef", uri, "1")
    run.save_pointer(tmp_path / "run")
    return run


def test_metrics_to_a_server_gone_away_give_one_error_with_the_checkpoints_and_how_to_resume(dead_server, tmp_path):
    with pytest.raises(TrackingError) as info:
        dead_server.lightning_logger().log_metrics({"train/loss": 1.0}, step=5)
    message = str(info.value)
    assert f"tracking server at {dead_server.tracking_uri} stopped answering during the run" in message
    assert "Connection refused" in message and "API request" not in message  # the cause, not MLflow's text
    assert f"checkpoints are kept under {tmp_path / 'run' / 'checkpoints'}" in message
    assert "resume=true" in message and "logger.fallback_to_local=true" in message
    # what comes after (marking the run FAILED) says it briefly
    with pytest.raises(TrackingError, match=r"is not answering \(.*Connection refused"):
        dead_server.end("FAILED")


def test_writes_through_the_run_and_its_client_are_guarded_too(dead_server):
    with pytest.raises(TrackingError, match="stopped answering"):
        dead_server.log_params({"a": "1"})
    with pytest.raises(TrackingError, match="is not answering"):
        dead_server.client.log_metric(dead_server.run_id, "x", 1.0)


def test_a_pipeline_stage_points_at_the_pipelines_own_resume_command(monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    run = TrackedRun(MlflowClient(tracking_uri=uri), "0123456789abcdef", uri, "1", in_pipeline=True)
    with pytest.raises(TrackingError, match="pipeline.start_at=") as info:
        run.set_tags({"a": "b"})
    assert "resume=true" not in str(info.value)


def test_an_answer_from_the_server_is_not_mistaken_for_a_server_gone():
    from mlflow.exceptions import MlflowException

    class Client:
        def set_tag(self, *args):
            raise MlflowException("Run 'x' not found")

    run = TrackedRun(Client(), "x", "http://127.0.0.1:5000", "1")
    with pytest.raises(MlflowException, match="not found"):
        run.set_tags({"a": "b"})
    # an answer that is not MLflow's JSON (an auth proxy's login page after a token expired) is an answer too
    Client.set_tag = lambda self, *args: (_ for _ in ()).throw(MlflowException(
        "API request to endpoint /api/2.0/mlflow/runs/set-tag failed with error code 401 != 200. Response body: "
        "'<html>login</html>'"))
    with pytest.raises(MlflowException, match="error code 401"):
        run.set_tags({"a": "b"})
    import copy

    assert copy.copy(run.client)._client is run.client._client  # the wrapper copies (no recursion on _client)


def test_resume_with_fallback_to_local_starts_a_new_local_run(tmp_path):
    """The hint's `resume=true logger.fallback_to_local=true`: the run to resume is on the server, so a new local
    run takes over, tagged with the one it continues."""
    server = f"http://127.0.0.1:{free_port()}"
    cfg = OmegaConf.create({"tracking_uri": server, "fallback_to_local": True, "connect_timeout_s": 1,
                            "experiment_name": "x"})
    with pytest.warns(UserWarning, match="logged there as a new run"):
        run = open_run(cfg, tmp_path, "r", {"stage": "t"}, resume_run_id="0123456789abcdef", resume_store=server)
    assert run.tracking_uri == default_tracking_uri(tmp_path)
    assert run.client.get_run(run.run_id).data.tags["resumed_from_run_id"] == "0123456789abcdef"
    run.end("KILLED")
    # resumed again while the server is still down: the checkpoint's pointer now names the local run, which goes on
    with pytest.warns(UserWarning, match="falling back to the local store"):
        again = open_run(cfg, tmp_path, "r", {"stage": "t"}, resume_run_id=run.run_id, resume_store=run.tracking_uri)
    assert again.run_id == run.run_id
    again.end()


def test_a_run_resumed_in_another_store_goes_on_as_a_new_run_there(tmp_path):
    """The pointer names a run in one store and the resumed run logs to another (the server back after a local
    stretch, or another logger.tracking_uri): reopening that run id there failed with 'cannot write to the store'."""
    first = open_run(OmegaConf.create({"tracking_uri": None}), tmp_path / "a", "r", {"stage": "t"})
    first.end("KILLED")
    other = default_tracking_uri(tmp_path / "b")
    with pytest.warns(UserWarning, match=f"is in {first.tracking_uri}, not in {other}"):
        run = open_run(OmegaConf.create({"tracking_uri": other}), tmp_path / "b", "r", {"stage": "t"},
                       resume_run_id=first.run_id, resume_store=first.tracking_uri)
    assert run.run_id != first.run_id
    assert run.client.get_run(run.run_id).data.tags["resumed_from_run_id"] == first.run_id
    run.end()


# ------------------------------------------------------------------------------------------------------ JSONL


def test_a_byte_order_mark_is_not_a_bad_row(tmp_path):
    from plugins.datasets.demonstrations import JsonlDemonstrations
    from plugins.datasets.text_files import TextFiles, read_jsonl_rows

    f = tmp_path / "bom.jsonl"
    f.write_bytes(codecs.BOM_UTF8 + b'{"text": "first", "prompt": "p", "response": "r"}\n{"text": "second"}\n')
    assert [(n, problem) for n, _, problem in read_jsonl_rows(f)] == [(1, None), (2, None)]
    assert [d.text for d in TextFiles(paths=[str(f)]).texts()] == ["first", "second"]
    f.write_bytes(codecs.BOM_UTF8 + b'{"prompt": "p", "response": "r"}\n')
    assert [d.response for d in JsonlDemonstrations(paths=[str(f)]).demonstrations()] == ["r"]
    t = tmp_path / "bom.txt"
    t.write_bytes(codecs.BOM_UTF8 + "a document".encode())
    assert [d.text for d in TextFiles(paths=[str(t)]).texts()] == ["a document"]


ARRAY = [{"prompt": "p", "response": "r"}, {"prompt": "q", "response": "s"}]


@pytest.mark.parametrize("text", [json.dumps(ARRAY, indent=1), json.dumps(ARRAY)], ids=["pretty", "one-line"])
@pytest.mark.parametrize("skip_bad_rows", [False, True])
def test_a_json_array_file_is_told_to_be_json_lines(tmp_path, text, skip_bad_rows):
    from plugins.datasets.comparisons import JsonlComparisons
    from plugins.datasets.demonstrations import JsonlDemonstrations

    f = tmp_path / "rows.json"
    f.write_text(text + "\n")
    for rows in (JsonlDemonstrations(paths=[str(f)], skip_bad_rows=skip_bad_rows).demonstrations(),
                 JsonlComparisons(paths=[str(f)], skip_bad_rows=skip_bad_rows).comparisons()):
        with pytest.raises(DataError, match=r"rows\.json:1: .*expected one JSON object per line \(JSON Lines\)") as info:
            list(rows)
        assert "skip_bad_rows" not in str(info.value)  # skipping would drop every row


# ------------------------------------------------------------------------------------------------ cache_dir


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_cache_dir_that_is_a_file_is_named_before_training(tmp_path, monkeypatch, below):
    from plugins.tokenizers.bpe import ByteLevelBPETrainer

    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    trainer = ByteLevelBPETrainer(vocab_size=300)
    monkeypatch.setattr(trainer, "train", lambda corpus: pytest.fail("trained before checking paths.cache_dir"))
    cache = blocker / below if below else blocker
    with pytest.raises(ConfigError, match=f"paths.cache_dir='{cache}': {blocker} is a file, not a folder"):
        trainer.build(["some text"] * 4, cache)
    assert blocker.read_text() == "not a folder"


def test_cli_names_a_cache_dir_that_is_a_file(run_cli_here, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    proc = run_cli_here("experiment=smoke", f"paths.cache_dir={blocker}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and f"error: paths.cache_dir='{blocker}'" in proc.stderr
