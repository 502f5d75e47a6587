"""Bad input to `rlhf compare` and `rlhf chat`: each problem is named with its fix (exit status 2, `error: ...`, no
traceback) before anything is written or any turn is sent, and nothing already there is lost."""

import pytest

from conftest import free_port
from framework.chat import main as chat
from framework.compare import main as compare
from framework.tracking import default_tracking_uri


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A local store under RLHF_HOME=tmp_path with two RL runs (one tagged note=it's); cwd is tmp_path."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # the default --out folder would be made here
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(tmp_path))
    exp = client.create_experiment("rlhf-lab")
    for i, note in enumerate(["it's", "plain"]):
        run = client.create_run(exp, run_name=f"run{i}", tags={"stage": "rl", "note": note})
        client.log_param(run.info.run_id, "seed", str(i))
        for step in range(3):
            client.log_metric(run.info.run_id, "eval/gold_reward", 0.1 * step + i, step=step)
            client.log_metric(run.info.run_id, "eval/kl", 0.2 * step, step=step)
        client.set_terminated(run.info.run_id)
    return tmp_path


def refused(capsys, *argv) -> str:
    """The one-line error of `rlhf compare argv` (exit status 2, nothing printed to stdout)."""
    assert compare(list(argv)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (out, err)
    return err


def test_compare_refuses_an_out_that_cannot_be_a_folder(store, capsys):
    kept = store / "notes.txt"
    kept.write_text("mine")
    err = refused(capsys, "--no-log", "--out", str(kept))
    assert f"--out {kept}: a file of that name exists" in err
    err = refused(capsys, "--no-log", "--out", str(kept / "sub"))
    assert f"--out {kept / 'sub'}: {kept} is a file, not a folder" in err
    assert kept.read_text() == "mine" and not list(store.glob("compare-*"))


def test_compare_refuses_a_folder_store_and_names_the_uri_forms(store, capsys):
    for uri in (f"file:{store / 'mlruns'}", str(store / "mlruns")):
        err = refused(capsys, "--tracking-uri", uri, "--no-log")
        assert f"--tracking-uri {uri} is a folder for MLflow's retired file store" in err
        assert "sqlite:///<absolute path>/mlflow.db" in err and "http://host:port" in err
    # a folder holding the local store: the URI that reads it
    err = refused(capsys, "--tracking-uri", str(store), "--no-log")
    assert f"or {default_tracking_uri(store)} for a database in that folder" in err
    assert not (store / "mlruns").exists()


def test_compare_on_an_unreachable_server_names_the_compare_flags(store, capsys, monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    err = refused(capsys, "--tracking-uri", uri, "--no-log")
    assert f"cannot reach the MLflow tracking server at {uri}" in err
    assert "mlflow server --backend-store-uri" in err and "--tracking-uri http://127.0.0.1:<port>" in err
    assert "leave out --tracking-uri" in err
    assert "Nothing was trained" not in err and "logger." not in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert "unset MLFLOW_TRACKING_URI" in refused(capsys, "--no-log")


def test_compare_refuses_a_sqlite_store_that_does_not_exist(store, capsys):
    err = refused(capsys, "--tracking-uri", "sqlite:///typo.db", "--no-log")
    assert f"no SQLite store at {store / 'typo.db'}, so nothing to compare" in err
    assert not (store / "typo.db").exists()  # MLflow would have made an empty one
    # three slashes and an absolute path: a relative path, which does not exist; the fix is the fourth slash
    db = str(store / "mlflow.db").lstrip("/")
    err = refused(capsys, "--tracking-uri", f"sqlite:///{db}", "--no-log")
    assert f"did you mean sqlite:////{db}?" in err
    assert "three slashes" in refused(capsys, "--tracking-uri", "sqlite://", "--no-log")  # SQLAlchemy: in memory


def test_compare_refuses_a_uri_mlflow_cannot_use(store, capsys):
    assert "is not a valid URL (Port could not be cast" in refused(capsys, "--tracking-uri", "http://127.0.0.1:abc")
    assert "names no host" in refused(capsys, "--tracking-uri", "http:///x")
    assert "has an unknown scheme 'htp:' (did you mean http://?)" in refused(capsys, "--tracking-uri",
                                                                             "htp://127.0.0.1:5000")


def test_compare_refuses_a_metric_or_param_no_run_has(store, capsys):
    err = refused(capsys, "--metrics", "eval/gold_reward,eval/gold_rewrd", "--no-log")
    assert "--metrics: 'eval/gold_rewrd' (did you mean 'eval/gold_reward'?) is in none of the selected runs" in err
    assert "their metrics: eval/gold_reward, eval/kl" in err
    err = refused(capsys, "--params", "sed", "--no-log")
    assert "--params: 'sed' (did you mean 'seed'?) is in none of the selected runs; their params: seed" in err
    assert not list(store.glob("compare-*"))
    # the names they have still work
    assert compare(["--metrics", "eval/kl", "--params", "seed", "--no-log", "--out", str(store / "ok")]) == 0
    assert "eval/kl (final)" in (store / "ok" / "table.txt").read_text()
    # a second comparison into the same folder would overwrite the first's table and plots
    first = (store / "ok" / "table.txt").read_text()
    capsys.readouterr()
    err = refused(capsys, "--metrics", "eval/gold_reward", "--no-log", "--out", str(store / "ok"))
    assert f"--out {store / 'ok'} already holds a comparison (table.txt)" in err
    assert (store / "ok" / "table.txt").read_text() == first


def test_compare_keeps_the_table_and_plots_when_logging_them_fails(store, capsys, monkeypatch):
    import mlflow

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "mlartifacts")

    monkeypatch.setattr(mlflow.MlflowClient, "log_artifact", read_only)
    out = store / "cmp"
    assert compare(["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: the table and plots are in {out}, but logging them to " in err and "add --no-log" in err
    assert (out / "table.txt").is_file() and (out / "eval_kl.png").is_file()
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(store))
    logged = client.search_runs([client.get_experiment_by_name("rlhf-lab").experiment_id], "tags.stage = 'compare'")
    assert [r.info.status for r in logged] == ["FAILED"]  # not left RUNNING


def test_compare_tag_values_with_quotes(store, capsys):
    out = store / "cmp"
    assert compare(["--tag", "note=it's", "--no-log", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "1 run(s)" in stdout and "run0" in stdout and "run1" not in stdout
    err = refused(capsys, "--tag", "note=it's \"both\"", "--no-log")
    assert "cannot match a value holding both ' and \"" in err and "--runs" in err


@pytest.mark.parametrize("argv,message", [
    (["--temperature", "0"], "--temperature 0: give a number > 0; for deterministic replies use --greedy"),
    (["--temperature", "-1"], "--temperature -1: give a number > 0"),
    (["--temperature", "nan"], "--temperature nan: give a number > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: give at least 1"),
    (["--top-p", "0"], "--top-p 0: give a number in (0, 1]"),
    (["--top-p", "2"], "--top-p 2: give a number in (0, 1]"),
])
def test_chat_refuses_sampling_settings_at_parsing(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:  # before the model is looked for
        chat([f"model.path={tmp_path / 'no-model'}", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "does not exist" not in err


def test_chat_greedy_takes_temperature_zero():
    from framework.chat import parse_args

    args = parse_args(["model.path=m", "--greedy", "--temperature", "0", "--top-p", "1", "--max-new-tokens", "1"])
    assert args.greedy and args.temperature == 0


def test_chat_prompts_must_be_utf8(tiny_policy, tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("hello\ncafé au lait\n".encode("latin-1"))
    assert chat(["--model", tiny_policy, "--prompts", str(latin1), "--greedy", "--max-new-tokens", "2"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: {latin1}:2: --prompts is not UTF-8 (byte 0xe9") and "save it as UTF-8" in err
    assert "Traceback" not in err and "bot> " not in out  # stopped before the first turn
    assert chat(["--model", tiny_policy, "--prompts", str(tmp_path / "none.txt"), "--greedy"]) == 2
    assert f"--prompts {tmp_path / 'none.txt'}: cannot read it (No such file or directory)" in capsys.readouterr().err
    # UTF-8, with a byte-order mark (Windows editors write one) and non-ASCII text: two turns
    good = tmp_path / "good.txt"
    good.write_text("café\nhow are you?\n", encoding="utf-8-sig")
    assert chat(["--model", tiny_policy, "--prompts", str(good), "--greedy", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "user> café" and out.count("bot> ") == 2
    # text piped in another encoding: one error line, not a traceback (the stream decodes a chunk at a time, so the
    # error comes when the chunk holding the bad byte is read)
    import io

    from framework.chat import parse_args, run_chat
    from framework.errors import DataError

    piped = io.TextIOWrapper(io.BytesIO("hello\ncafé\n".encode("latin-1")), encoding="utf-8")
    answered = io.StringIO()
    args = parse_args(["--model", tiny_policy, "--no-interactive", "--greedy", "--max-new-tokens", "2"])
    with pytest.raises(DataError, match=r"standard input is not UTF-8 .*byte 0xe9.*iconv -f latin1"):
        run_chat(args, piped, answered)
