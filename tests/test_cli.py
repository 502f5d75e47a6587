"""The `rlhf` command: help, config printing, overrides, errors for unknown groups/keys, multirun."""

import subprocess
import sys

import pytest

from conftest import QUIET, REPO, mlflow_runs


def test_help_lists_groups_without_importing_heavy_modules():
    code = (
        "import sys\n"
        "sys.argv = ['rlhf', '--help']\n"
        "from framework.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'pytorch_lightning', 'transformers', 'mlflow') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    for group in ("stage:", "model:", "tokenizer:", "dataset:", "trainer:", "logger:", "loss:"):
        assert group in out
    assert "tiny_llama" in out and "chitchat" in out
    assert "HEAVY []" in out


def test_console_script_and_module_print_resolved_config(run_cli):
    out = run_cli("--cfg", "job", "model.n_layer=2", "trainer.max_steps=50", "dataset=text_files",
                  "dataset.paths=[a.txt]").stdout
    assert "n_layer: 2" in out and "max_steps: 50" in out
    assert "plugins.datasets.text_files.TextFiles" in out


def test_unknown_group_option_lists_choices(run_cli):
    proc = run_cli("model=huge", check=False)
    assert proc.returncode != 0
    assert "Could not find 'model/huge'" in proc.stderr
    assert "tiny" in proc.stderr and "tiny_llama" in proc.stderr


def test_unknown_key_is_rejected(run_cli):
    proc = run_cli("model.n_layerz=2", check=False)
    assert proc.returncode != 0
    assert "n_layerz" in proc.stderr


def test_unknown_model_field_added_with_plus_is_rejected_before_training(run_cli_here, tmp_path):
    (tmp_path / "a.txt").write_text("hello there\n\nhow are you\n" * 50)
    proc = run_cli_here("experiment=smoke", "+model.n_layers=2", "dataset=text_files", f"dataset.paths=[{tmp_path}/a.txt]",
                   *QUIET, check=False)
    assert proc.returncode == 2
    assert "n_layers" in proc.stderr and "did you mean" in proc.stderr


@pytest.mark.parametrize("stage, loss", [("pretrain", "bradley_terry"), ("sft", "kwise")])
def test_a_preference_loss_for_a_language_model_stage_is_refused_before_any_work(run_cli_here, stage, loss):
    proc = run_cli_here(f"stage={stage}", f"loss={loss}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"is a 'preference' loss; stage={stage} trains a causal LM on next-token labels: loss=lm_cross_entropy" \
        in proc.stderr
    assert "corpus:" not in proc.stdout and "demonstrations" not in proc.stdout  # before any data was read


@pytest.mark.parametrize("override, message", [
    ("seed=abc", "error: seed='abc' is not a finite number"),
    ("split_seed=1.5", "error: split_seed=1.5 must be a whole number"),
    ("trainer.max_steps=abc", "error: trainer.max_steps='abc' is not a finite number"),
    ("trainer.max_steps=-1", "error: trainer.max_steps=-1: stages train for a number of optimizer steps"),
    # a `???` reached through an interpolation (model=pretrained's path, which policy.path is taken from)
    ("model=pretrained", "error: model.path is required and was not given (policy.path is taken from it): pass "
                         "model.path=<value>"),
])
def test_a_value_of_the_wrong_kind_is_named_before_any_work(run_cli_here, override, message):
    proc = run_cli_here("experiment=smoke", override, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "corpus:" not in proc.stdout


def test_a_required_value_left_out_is_named_with_the_fix(run_cli, tmp_path):
    proc = run_cli("stage=rl", f"policy.path={tmp_path}", *QUIET, check=False)  # reward=learned needs reward.path
    assert proc.returncode == 2
    assert "error: reward.path is required and was not given: pass reward.path=<value>" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_multirun_sweeps_each_value(run_cli, rlhf_home):
    proc = run_cli("--multirun", "experiment=smoke", "model.n_layer=1,2", "trainer.max_steps=6",
                   "trainer.val_check_interval=3", "stage.samples.prompts=[]", *QUIET)
    assert "#0" in proc.stdout and "#1" in proc.stdout
    assert "Tip:" not in proc.stdout + proc.stderr  # Lightning's litlogger/litmodels adverts, once per Trainer
    client, runs = mlflow_runs(rlhf_home)
    assert sorted(r.data.params["model.n_layer"] for r in runs) == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs)
