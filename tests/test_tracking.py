"""Tracking store resolution, fail-fast on unreachable servers, config flattening; checked plugin instantiation."""

import time

import pytest
from omegaconf import OmegaConf

from conftest import QUIET, free_port
from framework.errors import ConfigError, TrackingError
from framework.instantiate import instantiate_plugin
from framework.interfaces import PolicyAlgorithm, PreferenceAlgorithm, TextDataset, TokenizerSource
from framework.tracking import check_reachable, flatten_config, open_run, plugin_targets, resolve_tracking_uri


def test_default_store_is_sqlite_under_root(tmp_path):
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"


def test_env_var_is_respected_through_the_config(monkeypatch):
    from hydra import compose, initialize_config_module

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with initialize_config_module(config_module="rlhf_conf", version_base="1.3"):
        cfg = compose(config_name="config")
    assert cfg.logger.tracking_uri == "http://127.0.0.1:9"


def test_unreachable_server_fails_fast_with_the_uri():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match=f"cannot reach the MLflow tracking server at {uri}"):
        check_reachable(uri, timeout_s=2)
    assert time.monotonic() - start < 10


def test_fallback_to_local_store_only_when_asked(tmp_path):
    cfg = OmegaConf.create({"tracking_uri": f"http://127.0.0.1:{free_port()}", "fallback_to_local": True,
                            "connect_timeout_s": 1, "experiment_name": "x"})
    with pytest.warns(UserWarning, match="falling back to the local store"):
        run = open_run(cfg, tmp_path, "r", {"stage": "t"})
    assert run.tracking_uri.startswith("sqlite:///")
    run.end()


def test_a_table_is_written_once_per_file(tmp_path):
    """MLflow appends rows to an existing table file; a step evaluated again after a resume must not double it."""
    import json

    cfg = OmegaConf.create({"tracking_uri": None, "experiment_name": "x"})
    run = open_run(cfg, tmp_path, "r", {"stage": "t"})
    for _ in range(2):
        run.log_table({"prompt": ["a", "b"], "proxy": [1.0, 2.0]}, "samples/iter_00003.json")
    run.log_table({"prompt": ["c"], "proxy": [3.0]}, "samples/iter_00006.json")
    path = run.client.download_artifacts(run.run_id, "samples/iter_00003.json", str(tmp_path / "dl"))
    assert json.loads(open(path).read())["data"] == [["a", 1.0], ["b", 2.0]]
    assert {a.path for a in run.client.list_artifacts(run.run_id, "samples")} == {
        "samples/iter_00003.json", "samples/iter_00006.json"}
    run.end()


def test_cli_refuses_to_train_when_the_server_is_down(run_cli, rlhf_home):
    uri = f"http://127.0.0.1:{free_port()}"
    proc = run_cli("experiment=smoke", f"logger.tracking_uri={uri}", *QUIET, check=False)
    assert proc.returncode == 2
    assert uri in proc.stderr and "Nothing was trained" in proc.stderr
    assert not list(rlhf_home.glob("runs/**/model"))


def test_flatten_and_plugin_targets():
    cfg = OmegaConf.create({"a": {"_target_": "x.Y", "n": 2, "l": [1, 2]}, "b": 3})
    assert flatten_config(cfg) == {"a._target_": "x.Y", "a.n": "2", "a.l": "[1, 2]", "b": "3"}
    assert plugin_targets(cfg) == {"plugin.a": "x.Y"}


def test_instantiate_plugin_checks_targets():
    good = OmegaConf.create({"_target_": "plugins.datasets.chitchat.ChitchatCorpus", "max_documents": 1})
    assert isinstance(instantiate_plugin(good, "dataset", TextDataset), TextDataset)
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg'"):
        instantiate_plugin(OmegaConf.create({"_target_": "no_such_pkg.X"}), "dataset", TextDataset)
    with pytest.raises(ConfigError, match="has no 'ChitchatCorpsu'.*ChitchatCorpus"):
        instantiate_plugin(OmegaConf.create({"_target_": "plugins.datasets.chitchat.ChitchatCorpsu"}), "dataset")
    with pytest.raises(ConfigError, match="is not a framework.interfaces.TokenizerSource"):
        instantiate_plugin(good, "tokenizer", TokenizerSource)
    with pytest.raises(ConfigError, match="cannot build"):
        instantiate_plugin(OmegaConf.create({"_target_": "plugins.datasets.chitchat.ChitchatCorpus", "bogus": 1}),
                           "dataset", TextDataset)
    # a group with two contracts (algo: online or offline) names both, and a fix given by the stage replaces the
    # generic one; the class is refused before it is built
    with pytest.raises(ConfigError, match=r"algo._target_='plugins.datasets.chitchat.ChitchatCorpus' is not a "
                                          r"framework.interfaces.PolicyAlgorithm or "
                                          r"framework.interfaces.PreferenceAlgorithm; plugins of the 'algo' group"):
        instantiate_plugin(OmegaConf.create({"_target_": "plugins.datasets.chitchat.ChitchatCorpus", "bogus": 1}),
                           "algo", (PolicyAlgorithm, PreferenceAlgorithm))
    with pytest.raises(ConfigError, match=r"is not a framework.interfaces.TokenizerSource; use tokenizer=bpe$"):
        instantiate_plugin(good, "tokenizer", TokenizerSource, fix="use tokenizer=bpe")
    assert isinstance(instantiate_plugin(good, "dataset", (TokenizerSource, TextDataset)), TextDataset)
    # a user's class under another option's keys (algo._target_=... keeps PPO's): the fix is a node of its own
    with pytest.raises(ConfigError, match=r"algo: cannot build fractions.Fraction with keys \['clip', 'epochs'\]: "
                                          r".*unexpected keyword argument.*start a node of your own: '~algo' "
                                          r"'\+algo=\{_target_: fractions.Fraction\}'"):
        instantiate_plugin(OmegaConf.create({"_target_": "fractions.Fraction", "epochs": 4, "clip": 0.2}), "algo")
    # experiment=smoke sets tokenizer.vocab_size, which tokenizer=pretrained does not take: the key is named, with
    # the override that drops it
    with pytest.raises(ConfigError, match=r"unexpected keyword argument 'vocab_size'.*drop it with "
                                          r"'~tokenizer.vocab_size', or start a node of your own"):
        instantiate_plugin(OmegaConf.create({"_target_": "plugins.tokenizers.pretrained.PretrainedTokenizer",
                                             "path": "x", "vocab_size": 320}), "tokenizer")


def test_compare_names_a_missing_store_a_bad_tag_and_an_unknown_experiment(tmp_path, monkeypatch, capsys):
    """`rlhf compare` on bad input: each problem is named with its fix, exit status 2, nothing written."""
    import mlflow

    from framework.compare import main as compare
    from framework.tracking import default_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default --out folder would be made here
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "nowhere"))
    assert compare([]) == 2
    assert "no local MLflow store" in capsys.readouterr().err

    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    client = mlflow.MlflowClient(tracking_uri=default_tracking_uri(tmp_path))
    client.create_experiment("rlhf-lab")
    out = tmp_path / "cmp"
    assert compare(["--tag", "stage", "--out", str(out)]) == 2
    assert "--tag 'stage': write KEY=VALUE" in capsys.readouterr().err
    assert compare(["--experiment", "nope", "--out", str(out)]) == 2
    assert "no MLflow experiment 'nope' (there are: " in capsys.readouterr().err
    assert compare(["--tag", "stage=rl", "--out", str(out)]) == 2
    assert "no runs match" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("compare-*"))


class Annotated:  # no `from __future__ import annotations` in effect for the check: real types and strings both
    def __init__(self, steps: int = 1, scale: float | None = None, flag: bool = False, n: int = None,
                 betas: tuple[float, float] = (0.9, 0.95), sizes: "list[int] | None" = None):
        self.steps, self.scale, self.flag, self.n, self.betas, self.sizes = steps, scale, flag, n, betas, sizes


def test_number_parameters_are_checked_by_key_before_the_class_is_built():
    def build(**keys):
        return instantiate_plugin(OmegaConf.create({"_target_": "test_tracking.Annotated", **keys}), "algo")

    built = build(steps=1e4, scale=2, flag=True, n=None, betas=[0.9, 0.99], sizes=[1, 2])
    assert built.steps == 10000 and type(built.steps) is int  # a whole number written as a float (1e4)
    assert built.scale == 2 and built.n is None and built.betas == [0.9, 0.99] and built.sizes == [1, 2]
    for keys, message in [({"steps": "abc"}, r"algo.steps='abc' must be a whole number$"),
                          ({"steps": 2.5}, r"algo.steps=2.5 must be a whole number$"),
                          ({"steps": True}, r"algo.steps=True must be a whole number$"),
                          ({"scale": "x"}, r"algo.scale='x' must be a number \(or null\)$"),
                          ({"flag": 1}, r"algo.flag=1 must be true or false$"),
                          ({"n": "many"}, r"algo.n='many' must be a whole number \(or null\)$")]:
        with pytest.raises(ConfigError, match=message):
            build(**keys)
