"""The whole recipe through the real CLI at a tiny size (`rlhf pipeline=chatgpt`), with plugins of every stage
swapped from the command line; resuming from a middle stage from MLflow; a failed stage; `rlhf compare` on the runs."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from conftest import QUIET, REPO, cli_env, mlflow_runs
from framework.recipe import merge_overrides

TINY = [
    "pipeline=chatgpt", "model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.n_positions=128",
    "tokenizer.vocab_size=320", "trainer.enable_model_summary=false", *QUIET,
    "pipeline.stage_overrides.pretrain=['trainer.max_steps=30','trainer.val_check_interval=15','stage.seq_len=64',"
    "'stage.batch_size=16','stage.val_batches=2','dataset.max_documents=400','stage.samples.prompts=[]']",
    "pipeline.stage_overrides.sft=['trainer.max_steps=20','trainer.val_check_interval=10','stage.max_length=128',"
    "'stage.batch_size=8','dataset.max_conversations=300','task=friendly_reply','expert=task','stage.eval.prompts=8',"
    "'stage.eval.max_new_tokens=16','stage.samples.prompts=[]']",
    "pipeline.stage_overrides.reward_model=['dataset.n=60','stage.max_length=128','stage.optimizer.lr=1e-3',"
    "'stage.normalize.samples=16','trainer.val_check_interval=5']",
    "pipeline.stage_overrides.rl=['stage.iterations=2','stage.prompts_per_iteration=8','stage.max_new_tokens=16',"
    "'stage.eval.prompts=8','stage.eval.every_n_iterations=2']",
    "pipeline.stage_overrides.eval=['stage.prompts=8','stage.samples_per_prompt=4','stage.max_new_tokens=16',"
    "'bon.n=[1,2,4]']",
]
STAGES = ["pretrain", "sft", "reward_model", "rl", "eval"]


def artifacts(stdout: str) -> dict[str, str]:
    """{stage: artifact dir} from the pipeline's closing summary."""
    tail = stdout[stdout.rindex("pipeline chatgpt done:"):]
    return dict(re.findall(r"\[rlhf\]   (\w+): (\S+)", tail))


def compare(home, tokenizer_cache, *args):
    return subprocess.run([sys.executable, "-m", "framework", "compare", *args], cwd=REPO,
                          env=cli_env(home, tokenizer_cache), capture_output=True, text=True, timeout=300)


def test_merge_overrides_keeps_the_last_of_each_key():
    assert merge_overrides(["stage=sft", "a.b=1", "+c=2"], ["a.b=3", "algo=grpo"], ["~c"]) == \
        ["stage=sft", "a.b=3", "algo=grpo", "~c"]


def saved_run(root, name: str, cfg: dict, ckpt: str = "last.ckpt") -> Path:
    """A run folder under <root>/runs as a stage leaves it for resume=true: its config and an (empty) checkpoint."""
    from omegaconf import OmegaConf

    run = root / "runs" / name
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / ckpt).write_bytes(b"")
    OmegaConf.save(OmegaConf.create(cfg), run / ".hydra" / "config.yaml")
    return run / "checkpoints" / ckpt


def test_resume_picks_only_a_checkpoint_made_with_the_same_policy_and_reward(tmp_path):
    """resume=true: an RL checkpoint of another policy or reward (or a reward-model checkpoint of another
    stage.policy_path) is refused with the differing sections named; the matching one is picked."""
    from omegaconf import OmegaConf

    from framework.errors import ConfigError
    from framework.pipeline import find_resume_checkpoint

    rl = {"stage": {"name": "rl"}, "model": {"path": None}, "policy": {"path": "/sft"},
          "reward": {"_target_": "plugins.rewards.learned.LearnedReward", "path": "/rm_a"}, "algo": {"epochs": 4}}
    ckpt = saved_run(tmp_path, "a", rl)
    assert find_resume_checkpoint(tmp_path, OmegaConf.create(rl), "rl") == ckpt
    other = OmegaConf.create(rl)
    other.reward.path = "/rm_b"
    other.policy.path = "/other_sft"
    with pytest.raises(ConfigError, match="other policy, reward settings"):
        find_resume_checkpoint(tmp_path, other, "rl")
    rm = {"stage": {"name": "reward_model", "policy_path": "/small"}, "model": {"path": "/big"}}
    saved_run(tmp_path, "b", rm)
    moved = OmegaConf.create(rm)
    moved.stage.policy_path = "/another"
    with pytest.raises(ConfigError, match="other stage settings"):
        find_resume_checkpoint(tmp_path, moved, "reward_model")


def test_resume_matches_seed_kl_and_stage_settings_but_lets_the_run_grow(tmp_path):
    """A seed sweep resumes each seed's own run; another KL or optimizer setting is refused; a longer run, other
    checkpoint and evaluation intervals are the same run continued."""
    from omegaconf import OmegaConf

    from framework.errors import ConfigError
    from framework.pipeline import find_resume_checkpoint

    def rl(seed, **stage):
        return {"seed": seed, "stage": {"name": "rl", "iterations": 6, "checkpoint_every_n_iterations": 2,
                                        "eval": {"prompts": 8, "every_n_iterations": 2}, "kl": "${kl}",
                                        "optimizer": {"lr": 1e-5}, **stage},
                "kl": {"controller": "fixed", "coef": 0.05}, "policy": {"path": "/sft"}}

    seed0, seed1 = saved_run(tmp_path, "s0", rl(0)), saved_run(tmp_path, "s1", rl(1))
    os.utime(seed0, (2e9, 2e9))  # seed 0's checkpoint is the newest: seed 1 must still get its own
    assert find_resume_checkpoint(tmp_path, OmegaConf.create(rl(1)), "rl") == seed1
    assert find_resume_checkpoint(tmp_path, OmegaConf.create(rl(0)), "rl") == seed0
    longer = rl(0, iterations=12, checkpoint_every_n_iterations=4, eval={"prompts": 16, "every_n_iterations": 3})
    assert find_resume_checkpoint(tmp_path, OmegaConf.create(longer), "rl") == seed0
    with pytest.raises(ConfigError, match="other seed settings"):
        find_resume_checkpoint(tmp_path, OmegaConf.create(rl(2)), "rl")
    other_kl = OmegaConf.create(rl(0))
    other_kl.kl.coef = 0.5
    with pytest.raises(ConfigError, match="other kl settings"):
        find_resume_checkpoint(tmp_path, other_kl, "rl")
    with pytest.raises(ConfigError, match="other stage settings"):
        find_resume_checkpoint(tmp_path, OmegaConf.create(rl(0, optimizer={"lr": 1e-3})), "rl")


def test_resume_skips_an_rl_checkpoint_written_in_the_middle_of_an_iteration(tmp_path, capsys):
    import torch
    from omegaconf import OmegaConf

    from framework.errors import ConfigError
    from framework.pipeline import find_resume_checkpoint

    cfg = {"seed": 0, "stage": {"name": "rl"}}
    partial = saved_run(tmp_path, "a", cfg, "on_exception.ckpt")
    torch.save({"rl_state": {"iteration": 3, "mid_iteration": True}}, partial)
    with pytest.raises(ConfigError, match="middle of an RL iteration.*without resume"):
        find_resume_checkpoint(tmp_path, OmegaConf.create(cfg), "rl")
    last = partial.with_name("last.ckpt")
    torch.save({"rl_state": {"iteration": 2, "mid_iteration": False}}, last)
    os.utime(last, (1e9, 1e9))  # older than the partial one
    assert find_resume_checkpoint(tmp_path, OmegaConf.create(cfg), "rl") == last
    assert "skipping" in capsys.readouterr().out
    torch.save({"rl_state": {"iteration": 3, "mid_iteration": False}}, partial)  # an error at a boundary: whole
    assert find_resume_checkpoint(tmp_path, OmegaConf.create(cfg), "rl") == partial


def test_resume_skips_an_exception_checkpoint_from_before_the_first_step(tmp_path, capsys):
    """An older version saved on_exception.ckpt on an error at step 0: being the newest, resume=true started over
    from it and left the earlier run's progress behind."""
    import torch
    from omegaconf import OmegaConf

    from framework.pipeline import find_resume_checkpoint

    cfg = {"seed": 0, "stage": {"name": "pretrain"}}
    progress = saved_run(tmp_path, "a", cfg)
    torch.save({"global_step": 20}, progress)
    os.utime(progress, (1e9, 1e9))
    nothing = saved_run(tmp_path, "b", cfg, "on_exception.ckpt")
    torch.save({"global_step": 0}, nothing)
    assert find_resume_checkpoint(tmp_path, OmegaConf.create(cfg), "pretrain") == progress
    assert "before the first step" in capsys.readouterr().out
    torch.save({"global_step": 3}, nothing)  # an error after some steps: the newest progress
    assert find_resume_checkpoint(tmp_path, OmegaConf.create(cfg), "pretrain") == nothing


def test_a_run_dir_holding_another_runs_checkpoints_is_refused(tmp_path):
    """`hydra.run.dir=` given twice: the second run would overwrite the first's checkpoints (and, with Lightning's
    OnExceptionCheckpoint among the callbacks, silently continue from them); it may only continue from one."""
    from framework.errors import ConfigError
    from framework.pipeline import refuse_a_used_run_dir

    refuse_a_used_run_dir(tmp_path, None)  # a new folder
    (tmp_path / "checkpoints").mkdir()
    refuse_a_used_run_dir(tmp_path, None)  # an empty checkpoint folder
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    (tmp_path / "checkpoints" / "step20.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"{tmp_path} already holds the checkpoints of an earlier run \(last.ckpt, "
                                          rf"step20.ckpt\).*another hydra.run.dir.*ckpt_path={tmp_path}/checkpoints/"
                                          r"last.ckpt"):
        refuse_a_used_run_dir(tmp_path, None)
    with pytest.raises(ConfigError, match="already holds"):
        refuse_a_used_run_dir(tmp_path, str(tmp_path / "elsewhere" / "last.ckpt"))
    refuse_a_used_run_dir(tmp_path, str(tmp_path / "checkpoints" / "step20.ckpt"))  # continuing it
    # in a pipeline the user's ckpt_path= would reach every stage: not the fix offered there
    with pytest.raises(ConfigError, match="choose another hydra.run.dir for pipeline=chatgpt") as err:
        refuse_a_used_run_dir(tmp_path, None, "chatgpt")
    assert "ckpt_path" not in str(err.value)


def test_a_job_slurm_requeued_continues_from_its_folders_last_checkpoint(tmp_path, monkeypatch):
    from framework.pipeline import requeued_checkpoint

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert requeued_checkpoint(tmp_path) is None  # a new job: refused by refuse_a_used_run_dir instead
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_checkpoint(tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    assert requeued_checkpoint(tmp_path / "new") is None  # requeued before its first checkpoint: starts over


def test_a_pipeline_refuses_ckpt_path(run_cli_here, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    import torch

    torch.save({"global_step": 1}, ckpt)
    proc = run_cli_here("pipeline=chatgpt", f"ckpt_path={ckpt}", check=False)
    assert proc.returncode == 2 and "passes its overrides to every stage" in proc.stderr


def test_a_pipeline_refuses_data_parallel_trainers(run_cli_here):
    """Lightning starts a DDP run's other processes inside each stage, where they cannot follow the pipeline's
    hand-overs (its parent run, the previous stage's export): refused before any work, with the way that works."""
    from framework.distributed import data_parallel_processes

    proc = run_cli_here("pipeline=chatgpt", "trainer=ddp", "trainer.accelerator=cpu", check=False)
    assert proc.returncode == 2 and "with 2 training processes (trainer.devices=2" in proc.stderr
    assert "Run the stages one by one" in proc.stderr
    assert [data_parallel_processes(t) for t in ({"devices": 1}, {"devices": "3"}, {"devices": [0, 1]},
                                                  {"devices": "0,1", "num_nodes": 2}, {"devices": 2, "num_nodes": 2},
                                                  {"devices": "auto", "accelerator": "cpu"})] == [1, 3, 2, 4, 4, 1]
    # a stage's own trainer (pipeline.stage_overrides.<stage>=[trainer.devices=2]) is refused when that stage starts
    from framework.errors import ConfigError
    from framework.recipe import refuse_data_parallel_pipeline

    with pytest.raises(ConfigError, match=r"pipeline=chatgpt with 2 training processes \(stage rl\)"):
        refuse_data_parallel_pipeline({"devices": 2}, "chatgpt", "rl")
    refuse_data_parallel_pipeline({"devices": 1, "strategy": "ddp"}, "chatgpt", "rl")  # one process: fine


def test_ckpt_path_must_be_a_training_checkpoint(run_cli_here, tmp_path):
    weights = tmp_path / "model.safetensors"  # an export's weights given as a checkpoint: an easy mistake
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    proc = run_cli_here("experiment=smoke", f"ckpt_path={weights}", check=False)
    assert proc.returncode == 2 and "is not a training checkpoint" in proc.stderr and "model.path=" in proc.stderr


def test_the_exception_checkpoint_holds_progress_only_and_never_resumes_by_itself(tmp_path):
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from framework.stages.common import exception_checkpoint

    class Fails(pl.LightningModule):
        def __init__(self, at: int | None):
            super().__init__()
            self.at, self.layer, self.started_at = at, torch.nn.Linear(2, 1), None

        def on_train_start(self):
            self.started_at = self.trainer.global_step

        def training_step(self, batch, i):
            if self.trainer.global_step == self.at:
                raise RuntimeError("boom")
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(at, max_steps=4):
        module = Fails(at)
        trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[exception_checkpoint(tmp_path)],
                             default_root_dir=tmp_path, enable_checkpointing=False)
        try:
            trainer.fit(module, DataLoader(torch.ones(8, 2), batch_size=1))
        except RuntimeError:
            pass
        return module

    ckpt = tmp_path / "on_exception.ckpt"
    fit(at=0)
    assert not ckpt.exists()  # nothing trained: nothing to resume
    fit(at=2)
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    assert fit(at=None).started_at == 0  # a new fit beside it starts at step 0 (Lightning's class resumed it)
    assert not ckpt.exists()  # a fit that ends well removes it


def test_under_ddp_the_exception_checkpoint_is_saved_only_for_a_stop_every_process_took():
    """Saving ends in a barrier: a process that failed alone would wait there for the others forever (they wait in
    their next collective), so under DDP only a stop all processes took together (Ctrl-C's all-reduced decision, a
    NaN reward, `failing_together`) saves; in one process every error after a step does."""
    from types import SimpleNamespace

    from framework.distributed import raised_everywhere
    from framework.stages.common import exception_checkpoint

    saved = []

    def outcome(world_size, exception, step=3):
        saved.clear()
        trainer = SimpleNamespace(global_step=step, world_size=world_size, save_checkpoint=saved.append)
        exception_checkpoint(Path("ckpts")).on_exception(trainer, None, exception)
        return bool(saved)

    assert outcome(1, RuntimeError("one process"))
    assert not outcome(1, RuntimeError("one process"), step=0)
    assert not outcome(2, RuntimeError("one of two processes"))
    assert not outcome(2, KeyboardInterrupt())  # a second Ctrl-C: wherever each process was
    assert outcome(2, raised_everywhere(KeyboardInterrupt()))
    assert outcome(2, raised_everywhere(ValueError("every process")))


def test_pretraining_refuses_a_train_split_that_gives_a_process_less_than_a_batch():
    """Under DDP each process trains on its share of the blocks and the loader drops a last partial batch: 50
    blocks at batch 32 over 2 processes would train nothing (Lightning only says "No training batches")."""
    from framework.errors import DataError
    from framework.stages.pretrain import PackedTextDataModule

    class Tok:
        eos_token_id = 0

        def __call__(self, texts, **kwargs):
            return {"input_ids": [[5] * 15 for _ in texts]}  # 16 tokens a text with its EOS: one block of 16 each

    def data(world_size):
        return PackedTextDataModule(Tok(), ["t"] * 50, ["v"] * 2, seq_len=16, batch_size=32, seed=0,
                                    world_size=world_size)

    data(1).setup()
    with pytest.raises(DataError, match=r"the train split packs into 25 block\(s\) of 16 tokens per process \(2 "
                                        r"processes share 50\), fewer than 32"):
        data(2).setup()


def test_resume_accepts_a_checkpoint_from_before_a_plugin_gained_a_key_at_its_default(tmp_path):
    """A GRPO run saved before `algo.kl_estimator` existed (k3 was hard-coded) resumes under today's config, where
    the key holds GRPO's default; a value other than the default, or another plugin, still does not match."""
    from omegaconf import OmegaConf

    from framework.errors import ConfigError
    from framework.pipeline import find_resume_checkpoint

    old_algo = {"_target_": "plugins.algorithms.group.GRPO", "generations": 4, "beta": None}
    ckpt = saved_run(tmp_path, "old", {"stage": {"name": "rl"}, "algo": old_algo})
    today = OmegaConf.create({"stage": {"name": "rl"}, "algo": {**old_algo, "kl_estimator": "k3"}})
    assert find_resume_checkpoint(tmp_path, today, "rl") == ckpt
    today.algo.kl_estimator = "k2"
    with pytest.raises(ConfigError, match="other algo settings"):
        find_resume_checkpoint(tmp_path, today, "rl")
    rloo = OmegaConf.create({"stage": {"name": "rl"}, "algo": {**old_algo, "_target_": "plugins.algorithms.group.RLOO"}})
    with pytest.raises(ConfigError, match="other algo settings"):
        find_resume_checkpoint(tmp_path, rloo, "rl")


def test_the_recipe_in_one_command_then_resume_fail_and_compare(run_cli, run_cli_here, rlhf_home, tokenizer_cache,
                                                                 tmp_path):
    from framework.reward import load_reward_model

    # 1. every stage, with plugins of three stages swapped from the same command line
    proc = run_cli(*TINY, "imitation=dagger", "imitation.rollouts_per_round=8", "reward_head=ensemble", "algo=grpo")
    made = artifacts(proc.stdout)
    assert list(made) == STAGES
    for stage in ("pretrain", "sft", "rl"):
        assert AutoModelForCausalLM.from_pretrained(made[stage]).config.n_layer == 2
    _, _, info = load_reward_model(made["reward_model"])
    assert info["members"] == 4
    bon = json.loads((Path(made["eval"]) / "best_of_n.json").read_text())
    assert [r["n"] for r in bon["rows"]] == [1, 2, 4] and bon["policy"] == made["rl"]

    client, runs = mlflow_runs(rlhf_home)
    parent = next(r for r in runs if r.data.tags["stage"] == "pipeline")
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(STAGES) and parent.info.status == "FINISHED"
    for stage, run in children.items():
        assert run.data.metrics, stage
        assert run.data.tags["pipeline"] == "chatgpt", stage  # as the parent: `rlhf compare --tag pipeline=...`
        assert parent.data.tags[f"artifact.{stage}"] == made[stage]
    assert parent.data.tags["consumed.rl.reward.path"] == made["reward_model"]
    assert parent.data.tags["consumed.rl.policy.path"] == made["sft"]
    assert children["sft"].data.params["imitation._target_"] == "plugins.imitation.dagger.DAgger"
    assert "imitation/expert_labels" in children["sft"].data.metrics
    assert children["rl"].data.tags["plugin.algo"] == "plugins.algorithms.group.GRPO"
    assert "rl/eval/gold_reward" in parent.data.metrics
    from mlflow.artifacts import download_artifacts

    record = json.loads(Path(download_artifacts(run_id=parent.info.run_id, artifact_path="pipeline.json",
                                                dst_path=str(tmp_path), tracking_uri=client.tracking_uri)).read_text())
    assert record["eval"]["consumed"]["policy.path"] == made["rl"]

    # 2. resume from a middle stage: the SFT policy by its MLflow run, the reward model by its dir
    sft_run = children["sft"].info.run_id
    resumed = run_cli(*TINY, "pipeline.start_at=rl", f"pipeline.inputs.sft=runs:/{sft_run}",
                      f"pipeline.inputs.reward_model={made['reward_model']}")
    again = artifacts(resumed.stdout)
    assert again["sft"] == made["sft"] and again["reward_model"] == made["reward_model"]
    assert again["rl"] != made["rl"] and "pipeline chatgpt: stage 1/5" not in resumed.stdout

    # 3. a failed stage: the artifacts before it stay, and the message says how to continue
    failed = run_cli_here(*TINY, "pipeline.start_at=rl", f"pipeline.inputs.sft={made['sft']}",
                          f"pipeline.inputs.reward_model={made['reward_model']}",
                          "pipeline.stage_overrides.rl=['stage.max_new_tokens=500']", check=False)
    assert failed.returncode == 2 and "leaves no room for a prompt" in failed.stderr
    assert "stage 'rl' did not finish" in failed.stdout and "pipeline.start_at=rl" in failed.stdout
    assert f"pipeline.inputs.reward_model={made['reward_model']}" in failed.stdout
    missing = run_cli_here(*TINY, "pipeline.start_at=rl", check=False)
    assert missing.returncode == 2 and "pipeline.inputs.sft=<dir or runs:/<run id>>" in missing.stderr

    # 4. a --multirun sweep of pipelines (here only their eval stage, over two seeds)
    swept = run_cli("--multirun", *TINY, "pipeline.start_at=eval", f"pipeline.inputs.rl={made['rl']}",
                    f"pipeline.inputs.reward_model={made['reward_model']}", "seed=1,2")
    assert swept.stdout.count("pipeline chatgpt done:") == 2

    # 5. compare the RL runs (GRPO from the full run, PPO from the resumed one)
    out = tmp_path / "cmp"
    # the stage runs carry the pipeline's tag, as the parent does (docs/quickstart.md's command)
    cmp = compare(rlhf_home, tokenizer_cache, "--tag", "pipeline=chatgpt", "--stage", "rl", "--out", str(out))
    assert cmp.returncode == 0, cmp.stderr
    assert "GRPO" in cmp.stdout and "PPO" in cmp.stdout and "eval/gold_reward (final)" in cmp.stdout
    assert (out / "gold_vs_sqrt_kl.png").is_file() and (out / "eval_gold_reward.png").is_file()
    _, runs = mlflow_runs(rlhf_home)
    logged = next(r for r in runs if r.data.tags.get("stage") == "compare")
    assert {a.path for a in client.list_artifacts(logged.info.run_id)} >= {"gold_vs_sqrt_kl.png", "table.txt"}
    nothing = compare(rlhf_home, tokenizer_cache, "--experiment", "nope")
    assert nothing.returncode == 2 and "no MLflow experiment 'nope'" in nothing.stderr


@pytest.mark.parametrize("args,message", [
    (["pipeline.start_at=ppo"], "unknown stage name(s) ['ppo']"),
    (["stage=rl"], "drop stage=... from the command line"),
    (["pipeline.start_at=rl", "pipeline.inputs.sft=/no/such/dir"], "pipeline.inputs.sft=/no/such/dir: no such directory"),
    (["++stage.iteration=3"], "stage.iteration: no stage of this run (pretrain, sft, reward_model, rl, eval) has that key"),
])
def test_pipeline_input_errors(run_cli, args, message):
    proc = run_cli(*TINY, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_stage_setting_on_the_command_line_reaches_the_stages_that_have_it():
    """`rlhf pipeline=chatgpt ++stage.iterations=5` shortens RL and leaves the stages without that key alone (they
    would refuse it); `stage.eval.prompts` reaches SFT and RL, which both have it, `stage.batch_size` not RL."""
    from hydra import compose, initialize_config_dir

    from framework.recipe import stage_settings

    from framework.recipe import stage_config

    user = ["++stage.iterations=5", "stage.eval.prompts=8", "stage.batch_size=8", "trainer.max_steps=50"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        pipe = compose(config_name="config", overrides=["pipeline=chatgpt"]).pipeline
        assert stage_settings("pretrain", user, pipe) == {"stage.batch_size=8"}
        assert stage_settings("sft", user, pipe) == {"stage.eval.prompts=8", "stage.batch_size=8"}
        assert stage_settings("rl", user, pipe) == {"++stage.iterations=5", "stage.eval.prompts=8"}
        rl, _ = stage_config("rl", user, pipe, {"sft": Path("/sft"), "reward_model": Path("/rm")}, Path("/out"))
        assert rl.stage.iterations == 5 and rl.stage.eval.prompts == 8 and rl.trainer.max_steps == 50
        pretrain, _ = stage_config("pretrain", user, pipe, {}, Path("/out"))
        assert pretrain.stage.batch_size == 8 and "iterations" not in pretrain.stage


def test_stage_settings_see_config_groups_on_the_users_searchpath(tmp_path):
    """A pipeline whose stage uses a config group of the user's (on hydra.searchpath) still takes `stage.<key>=...`:
    the probe that decides which stages have the key composes with the user's searchpath too."""
    from hydra import compose, initialize_config_dir

    from framework.recipe import stage_config, stage_settings

    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "my_rm.yaml").write_text("_target_: plugins.rewards.learned.LearnedReward\npath: null\n"
                                                    "allow_unnormalized: true\n")
    user = ["stage.iterations=5", f"hydra.searchpath=[file://{tmp_path}]"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        pipe = compose(config_name="config", overrides=["pipeline=chatgpt",
                                                        "pipeline.stage_overrides.rl=['reward=my_rm']"]).pipeline
        has = stage_settings("rl", user, pipe)
        assert has == {"stage.iterations=5"}
        rl, _ = stage_config("rl", user, pipe, {"sft": Path("/sft"), "reward_model": Path("/rm")}, Path("/out"), has)
        assert rl.stage.iterations == 5 and rl.reward.allow_unnormalized and "batch_size" not in rl.reward


def test_the_pipeline_probes_stage_keys_with_the_users_searchpath(run_cli, tmp_path):
    """Through the CLI: with a stage using the user's config group, a misspelt stage key is refused by name (before
    the fix, the probe failed on the group with Hydra's MissingConfigException)."""
    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "my_rm.yaml").write_text("_target_: plugins.rewards.learned.LearnedReward\npath: null\n")
    proc = run_cli(*TINY, f"hydra.searchpath=[file://{tmp_path}]", "pipeline.stage_overrides.rl=['reward=my_rm']",
                   "++stage.iteration=3", check=False)
    assert proc.returncode == 2 and "stage.iteration: no stage of this run" in proc.stderr, proc.stderr[-2000:]
