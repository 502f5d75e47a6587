"""A user's plugin from outside the package, picked by `_target_` or by a config group on hydra.searchpath."""

import textwrap

import pytest

from conftest import QUIET, mlflow_runs

SMALL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.n_positions=64", "tokenizer.vocab_size=300",
         "stage.seq_len=32", "stage.batch_size=4", "stage.val_fraction=0.2", "trainer.max_steps=3",
         "trainer.val_check_interval=3", "stage.samples.prompts=[]", *QUIET]


@pytest.fixture
def user_project(tmp_path):
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "corpus.py").write_text(textwrap.dedent('''
        from pathlib import Path
        from framework.interfaces import TextDataset
        from framework.records import Text

        class Poems(TextDataset):
            def __init__(self, folder: str):
                self.folder = folder

            def texts(self):
                for p in sorted(Path(self.folder).glob("*.txt")):
                    yield Text(p.read_text(), source=str(p))

            def describe(self):
                return f"user poems in {self.folder}"
    '''))
    poems = tmp_path / "poems"
    poems.mkdir()
    for i in range(30):
        (poems / f"{i}.txt").write_text(f"poem {i}: the quick brown fox jumps over the lazy dog. " * 6)
    conf = tmp_path / "my_conf" / "dataset"
    conf.mkdir(parents=True)
    (conf / "poems.yaml").write_text(f"_target_: my_pkg.corpus.Poems\nfolder: {poems}\n")
    return tmp_path


def test_plugin_by_target(user_project, run_cli, rlhf_home):
    proc = run_cli("~dataset", f"+dataset={{_target_: my_pkg.corpus.Poems, folder: '{user_project / 'poems'}'}}",
                   *SMALL, env={"PYTHONPATH": str(user_project)})
    assert "user poems in" in proc.stdout
    _, runs = mlflow_runs(rlhf_home)
    assert runs[0].data.tags["plugin.dataset"] == "my_pkg.corpus.Poems"


def test_plugin_config_group_on_searchpath(user_project, run_cli, rlhf_home):
    proc = run_cli(f"hydra.searchpath=[file://{user_project / 'my_conf'}]", "dataset=poems", *SMALL,
                   env={"PYTHONPATH": str(user_project)})
    assert "user poems in" in proc.stdout
    _, runs = mlflow_runs(rlhf_home)
    assert runs[0].data.tags["plugin.dataset"] == "my_pkg.corpus.Poems"


def test_plugin_of_the_wrong_kind_is_refused(user_project, run_cli):
    proc = run_cli(f"hydra.searchpath=[file://{user_project / 'my_conf'}]", "dataset=poems",
                   "tokenizer._target_=my_pkg.corpus.Poems", *SMALL,
                   env={"PYTHONPATH": str(user_project)}, check=False)
    assert proc.returncode == 2
    assert "tokenizer._target_='my_pkg.corpus.Poems' is not a framework.interfaces.TokenizerSource" in proc.stderr


def test_documented_imitation_plugin_runs(tmp_path, run_cli, rlhf_home):
    """The ForwardTraining example of docs/sft-and-dagger.md, copied from the doc itself, through the CLI."""
    import re

    from conftest import REPO
    from test_sft_e2e import SORT

    doc = (REPO / "docs" / "sft-and-dagger.md").read_text()
    code = re.search(r"```python\n# my_pkg/smile.py\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "smile.py").write_text(code)
    overrides = [o for o in SORT if not o.startswith("trainer.max_steps")]
    run_cli(*overrides, "~imitation", "+imitation={_target_: my_pkg.smile.ForwardTraining, rounds: 2, rollouts: 20}",
            "trainer.max_steps=40", env={"PYTHONPATH": str(tmp_path)})
    client, runs = mlflow_runs(rlhf_home)
    assert runs[0].data.tags["plugin.imitation"] == "my_pkg.smile.ForwardTraining"
    assert runs[0].info.status == "FINISHED"


def test_documented_policy_algorithm_runs(tmp_path, chat_model, run_cli, rlhf_home):
    """The VanillaPG example of docs/rl.md, copied from the doc itself, through the CLI."""
    import re

    from conftest import REPO

    doc = (REPO / "docs" / "rl.md").read_text()
    code = re.search(r"```python\n# my_pkg/vanilla_pg.py\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "vanilla_pg.py").write_text(code)
    _, _, sft_dir, _ = chat_model
    run_cli("stage=rl", f"policy.path={sft_dir}", "reward=gold", "~algo",
            "+algo={_target_: my_pkg.vanilla_pg.VanillaPG}", "stage.iterations=2", "stage.prompts_per_iteration=4",
            "stage.max_new_tokens=8", "stage.eval.prompts=0", *QUIET, env={"PYTHONPATH": str(tmp_path)})
    _, runs = mlflow_runs(rlhf_home)
    assert runs[0].data.tags["plugin.algo"] == "my_pkg.vanilla_pg.VanillaPG"
    assert runs[0].info.status == "FINISHED" and "loss/policy" in runs[0].data.metrics


def doc_package(tmp_path, doc: str, package: str = "my_plugins"):
    """Every ```python block of `doc` that starts with `# <package>/<file>.py`, written into tmp_path/<package>."""
    import re

    from conftest import REPO

    text = (REPO / "docs" / doc).read_text()
    (tmp_path / package).mkdir(exist_ok=True)
    (tmp_path / package / "__init__.py").write_text("")
    files = re.findall(rf"```python\n# {package}/(\w+\.py)\n(.*?)```", text, re.S)
    for name, code in files:
        (tmp_path / package / name).write_text(code)
    return [name for name, _ in files]


def test_writing_plugins_examples_run(tmp_path, chat_model, run_cli, rlhf_home):
    """docs/writing-plugins.md, copied from the page: a loss and a reward head by _target_ (reward model), a reward
    source as a config group on hydra.searchpath (RL), a dataset and a task with an expert by _target_ (SFT with
    DAgger), all from a temporary directory, with no edit to framework/ or plugins/."""
    import json

    from conftest import exported_dir

    written = doc_package(tmp_path, "writing-plugins.md")
    assert sorted(written) == ["brevity.py", "count.py", "faq.py", "heads.py", "hinge.py"]
    env = {"PYTHONPATH": str(tmp_path)}
    _, pretrained, sft_dir, _ = chat_model

    rm = run_cli("stage=reward_model", f"model.path={sft_dir}", "labeller/gold=length", "dataset.n=40",
                 "stage.max_length=128", "stage.normalize.samples=8", "trainer.val_check_interval=2",
                 "~loss", "+loss={_target_: my_plugins.hinge.Hinge, margin: 0.5}",
                 "~reward_head", "+reward_head={_target_: my_plugins.heads.MaxPool}", *QUIET, env=env)
    exported_dir(rm.stdout, "reward model")

    conf = tmp_path / "my_conf" / "reward"
    conf.mkdir(parents=True)
    (conf / "brevity.yaml").write_text("_target_: my_plugins.brevity.Brevity\nwords: 8\n")
    # the page: a value of the wrong kind for an annotated parameter is refused by its key before the class is built
    import sys

    from omegaconf import OmegaConf

    from framework.errors import ConfigError
    from framework.instantiate import instantiate_plugin

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigError, match=r"^reward.words='eight' must be a whole number$"):
            instantiate_plugin(OmegaConf.create({"_target_": "my_plugins.brevity.Brevity", "words": "eight"}), "reward")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "my_plugins" or m.startswith("my_plugins.")]:
            del sys.modules[name]
    run_cli(f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "stage=rl", f"policy.path={sft_dir}",
            "reward=brevity", "stage.iterations=2", "stage.prompts_per_iteration=4", "stage.max_new_tokens=8",
            "stage.eval.prompts=4", "stage.eval.every_n_iterations=2", *QUIET, env=env)

    faq = tmp_path / "faq.json"
    faq.write_text(json.dumps([{"q": f"what is {i} plus one?", "a": f"It is {i + 1}."} for i in range(40)]))
    small = ["stage.samples.prompts=[]", "stage.max_length=128", "trainer.max_steps=8", "trainer.val_check_interval=4",
             *QUIET]
    run_cli("stage=sft", f"model.path={pretrained}", "~dataset", f"+dataset={{_target_: my_plugins.faq.FAQ, path: '{faq}'}}",
            *small, env=env)
    # the task's command as the page gives it (task demonstrations, the task as the expert, DAgger), made small
    run_cli("stage=sft", f"model.path={pretrained}", "+task={_target_: my_plugins.count.CountUp}", "dataset=task_demos",
            "expert=task", "imitation=dagger", "dataset.n=200", "imitation.rollouts_per_round=4",
            "stage.eval.prompts=4", "stage.eval.max_new_tokens=12", *small, env=env)

    _, runs = mlflow_runs(rlhf_home)
    sft_runs = [r for r in runs if r.data.tags["stage"] == "sft"]  # newest first: the task's, then the FAQ's
    assert [r.data.tags["plugin.dataset"] for r in sft_runs] == [
        "plugins.datasets.demonstrations.TaskDemonstrations", "my_plugins.faq.FAQ"]
    assert sft_runs[0].data.tags["plugin.task"] == "my_plugins.count.CountUp"
    tags = {r.data.tags["stage"]: r.data.tags for r in runs}
    assert tags["reward_model"]["plugin.loss"] == "my_plugins.hinge.Hinge"
    assert tags["reward_model"]["plugin.reward_head"] == "my_plugins.heads.MaxPool"
    assert tags["rl"]["plugin.reward"] == "my_plugins.brevity.Brevity"
    assert all(r.info.status == "FINISHED" for r in runs)
