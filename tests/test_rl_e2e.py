"""Stage 4 end to end through the real CLI at a tiny size: every policy algorithm against the gold reward, a learned
reward model (and its missing normalisation), and the errors a user meets first."""

import pytest
from transformers import AutoModelForCausalLM

from conftest import QUIET, exported_dir, mlflow_runs

TINY_RL = ["stage=rl", "stage.iterations=3", "stage.prompts_per_iteration=8", "stage.max_new_tokens=16",
           "stage.eval.prompts=16", "stage.eval.every_n_iterations=3", "trainer.enable_model_summary=false", *QUIET]


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo", "reinforce"])
def test_each_algorithm_runs_logs_and_exports(chat_model, run_cli, rlhf_home, algo):
    _, _, sft_dir, _ = chat_model
    # PPO's value head on a branch of the policy's top layer (the plain value head: the resume test below)
    extra = (["algo.minibatches=2", "algo.epochs=2", "stage.checkpoint_every_n_iterations=1", "algo.value_layers=1"]
             if algo == "ppo" else [])
    proc = run_cli(*TINY_RL, f"policy.path={sft_dir}", "reward=gold", f"algo={algo}", *extra)
    # Lightning's warnings that do not apply to this stage stay out of the user's log
    assert "pre-optimization state" not in proc.stderr and "`IterableDataset` has `__len__`" not in proc.stderr
    model_dir = exported_dir(proc.stdout)
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.n_layer == 2
    client, runs = mlflow_runs(rlhf_home)
    run = runs[0]
    m = run.data.metrics
    for key in ("objective/scores", "objective/kl", "objective/kl_coef", "objective/entropy", "loss/policy",
                "response/length", "response/eos_fraction", "episodes_per_s", "time/generation_s",
                "eval/gold_reward", "eval/proxy_reward"):
        assert key in m, key
    assert m["first_minibatch/policy/ratio"] == pytest.approx(1.0, abs=1e-6)
    iterations = [x.step for x in client.get_metric_history(run.info.run_id, "objective/scores")]
    assert sorted(iterations) == [0, 1, 2]
    assert {x.step for x in client.get_metric_history(run.info.run_id, "eval/gold_reward")} == {0, 3}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/iter_00003.json" in artifacts
    if algo == "grpo":  # the sample table: completions with their proxy and gold scores (the same reward here)
        import json

        table = json.loads(open(client.download_artifacts(run.info.run_id, "samples/iter_00003.json")).read())
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        assert len(rows) == 16 and set(rows[0]) == {"prompt", "completion", "proxy", "gold"}
        assert all(r["proxy"] == pytest.approx(r["gold"]) for r in rows)
        gold_at_3 = {x.step: x.value for x in client.get_metric_history(run.info.run_id, "eval/gold_reward")}[3]
        assert sum(r["gold"] for r in rows) / 16 == pytest.approx(gold_at_3, abs=1e-6)
    if algo == "ppo":
        assert "val/var_explained" in m and "loss/value" in m
        assert "critic: a value branch of 1 layer (" in proc.stdout
    assert run.data.tags["plugin.algo"].startswith("plugins.algorithms.")


def test_learned_reward_and_its_normalisation(chat_model, run_cli, run_cli_here, rlhf_home):
    _, _, sft_dir, _ = chat_model
    rm = run_cli("stage=reward_model", f"model.path={sft_dir}", "labeller/gold=length", "dataset.n=120",
                 "stage.max_length=128", "stage.normalize.samples=0", "trainer.val_check_interval=5",
                 "trainer.enable_model_summary=false", *QUIET)
    rm_dir = exported_dir(rm.stdout, "reward model")
    refused = run_cli_here(*TINY_RL, f"policy.path={sft_dir}", "reward=learned", f"reward.path={rm_dir}", check=False)
    assert refused.returncode != 0 and "has no normalisation" in refused.stderr
    proc = run_cli(*TINY_RL, f"policy.path={sft_dir}", "reward=learned", f"reward.path={rm_dir}",
                   "reward.allow_unnormalized=true", "kl.controller=adaptive", "kl.target=1.0", "algo.minibatches=2")
    exported_dir(proc.stdout)
    _, runs = mlflow_runs(rlhf_home)
    rl = next(r for r in runs if r.data.tags["stage"] == "rl")
    assert rl.data.params["kl.controller"] == "adaptive" and "objective/kl_coef" in rl.data.metrics
    assert rl.data.metrics["objective/kl_coef"] != 0.05  # the controller moved it from kl.coef
    # PPO with a separate critic initialised from the same reward model, cut to its bottom layer (of 2)
    critic = run_cli(*TINY_RL, f"policy.path={sft_dir}", "reward=learned", f"reward.path={rm_dir}",
                     "reward.allow_unnormalized=true", "algo.critic=separate", "algo.critic_layers=1",
                     "algo.minibatches=2", "stage.eval.prompts=0")
    assert "critic: a separate GPT2Model" in critic.stdout and ", its bottom 1 layer" in critic.stdout
    exported_dir(critic.stdout)
    no_rm = run_cli_here(*TINY_RL, f"policy.path={sft_dir}", "reward=gold", "algo.critic=separate", check=False)
    assert no_rm.returncode != 0 and "algo.critic_path=<reward model dir>" in no_rm.stderr


def test_user_errors(chat_model, run_cli, run_cli_here):
    _, _, sft_dir, _ = chat_model
    no_policy = run_cli_here("stage=rl", "reward=gold", check=False)
    assert no_policy.returncode != 0 and "policy.path=<the SFT model dir>" in no_policy.stderr
    too_long = run_cli_here("stage=rl", f"policy.path={sft_dir}", "reward=gold", "stage.max_new_tokens=500",
                            check=False)
    assert too_long.returncode != 0 and "leaves no room for a prompt" in too_long.stderr
    no_rm = run_cli_here("stage=rl", f"policy.path={sft_dir}", check=False)
    assert no_rm.returncode != 0 and "reward.path" in no_rm.stderr
    # prompts longer than the room the context leaves (128 - 120 new tokens): cut from the left, with a warning
    cut = run_cli(*TINY_RL, f"policy.path={sft_dir}", "reward=gold", "algo=reinforce", "stage.iterations=1",
                  "stage.prompts_per_iteration=4", "stage.max_new_tokens=120", "stage.eval.prompts=0")
    assert "prompts are longer than 8 tokens (context 128 - stage.max_new_tokens 120)" in cut.stdout
    exported_dir(cut.stdout)
    for setting, message in (("kl.estimator=k4", "kl.estimator='k4': use one of k1, k2, k3"),
                             ("kl.controller=adaptive", "kl.controller=adaptive needs kl.target")):
        bad_kl = run_cli_here("stage=rl", f"policy.path={sft_dir}", "reward=gold", setting, check=False)
        assert bad_kl.returncode != 0 and message in bad_kl.stderr and "Traceback" not in bad_kl.stderr


def test_an_interrupted_run_resumes_to_the_same_metrics(chat_model, run_cli, rlhf_home, tokenizer_cache):
    """Kill a PPO run after a checkpoint, resume it, and get the uninterrupted run's metrics (same seed). The
    settings make every part of the state matter: an adaptive KL coefficient, a learning rate large enough that
    lost optimizer moments would change the losses, a cosine schedule that moves the lr every update, a value
    head."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, cli_env

    _, _, sft_dir, _ = chat_model
    # 24 iterations, the first checkpoint after 2: the interrupt lands long before the end (with 6, a fast machine
    # finished the run between the checkpoint and the signal)
    iterations = 24
    args = [*TINY_RL, f"policy.path={sft_dir}", "reward=gold", f"stage.iterations={iterations}", "algo.minibatches=2",
            "algo.epochs=1", "stage.checkpoint_every_n_iterations=2", "stage.eval.prompts=0",
            "kl.controller=adaptive", "kl.target=0.5", "kl.horizon=200", "stage.optimizer.lr=3e-4"]
    keys = ("objective/scores", "objective/kl", "objective/kl_coef", "loss/policy", "loss/value", "lr")

    def history(home):
        client, runs = mlflow_runs(home)
        return {k: {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, k)} for k in keys}

    straight_home = rlhf_home.parent / "straight"
    run_cli(*args, env={"RLHF_HOME": str(straight_home)})
    expected = history(straight_home)
    coefs = [expected["objective/kl_coef"][s] for s in range(iterations)]
    assert len(set(coefs)) > iterations // 2  # the controller moves the coefficient: its state is worth restoring

    proc = subprocess.Popen([sys.executable, "-m", "framework", *args], cwd=REPO,
                            env=cli_env(rlhf_home, tokenizer_cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(rlhf_home.glob("runs/**/checkpoints/step*.ckpt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert "did not finish" in out, out[-2000:]
    resumed = run_cli(*args, "resume=true")
    assert "resuming from" in resumed.stdout and "nothing to train" not in resumed.stdout
    got = history(rlhf_home)
    for key in keys:
        assert sorted(got[key]) == sorted(expected[key]) == list(range(iterations)), (key, sorted(got[key]))
        for step in range(iterations):
            assert got[key][step] == pytest.approx(expected[key][step], rel=1e-5, abs=1e-7), (key, step)
    # resuming the finished run trains nothing, and says so (Lightning's own fit returns silently)
    again = run_cli(*args, "resume=true")
    assert "nothing to train" in again.stdout and "stage.iterations" in again.stdout, again.stdout[-2000:]
    assert history(rlhf_home) == got


# at the start the policy is the reference, so the margin h is 0: DPO's loss is -log sigmoid(0), IPO's (0 - 1/(2 beta))^2
@pytest.mark.parametrize("loss_type, first_loss", [("sigmoid", 0.6931),
                                                   pytest.param("ipo", 25.0, marks=pytest.mark.slow)])
def test_dpo_on_comparisons_labelled_here(chat_model, run_cli, run_cli_here, rlhf_home, loss_type, first_loss):
    _, _, sft_dir, _ = chat_model
    proc = run_cli("stage=rl", f"policy.path={sft_dir}", "algo=dpo", f"algo.loss_type={loss_type}", "algo.beta=0.1",
                   "dataset=policy_comparisons", "labeller=synthetic",
                   "labeller/gold=length", "dataset.n=64", "stage.offline.batch_size=8", "stage.offline.max_length=128",
                   "stage.offline.epochs=2", "stage.optimizer.lr=5e-4", "trainer.val_check_interval=4",
                   "trainer.log_every_n_steps=1", "trainer.enable_model_summary=false", *QUIET)
    model_dir = exported_dir(proc.stdout)
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.n_layer == 2
    client, runs = mlflow_runs(rlhf_home)
    m = runs[0].data.metrics
    for key in ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/pairs_per_s",
                "val/loss", "val/rewards/accuracies"):
        assert key in m, key

    def history(key):
        return [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda x: x.step)]

    assert history("val/loss")[0] == pytest.approx(first_loss, abs=1e-3)
    losses, margins = history("train/loss"), history("train/rewards/margins")
    assert losses[0] == pytest.approx(first_loss, abs=1e-3)
    # it fits the comparisons it trains on (the second epoch against the first step). Not asserted on the ~7 held-out
    # pairs: at this size a tiny policy does not generalise "longer is better" from 58 pairs, and whether their loss
    # fell was the luck of the split (it failed in CI once the split changed)
    late = len(losses) // 2
    assert sum(losses[late:]) / len(losses[late:]) < first_loss and sum(margins[late:]) > 0, (losses, margins)
    if loss_type == "sigmoid":
        wrong = run_cli_here("stage=rl", f"policy.path={sft_dir}", "algo=dpo", check=False)
        assert wrong.returncode != 0 and "trains on comparisons" in wrong.stderr


# one epoch of 36 pairs at batch 8: the 4 whole batches the loader yields (the last 4 pairs dropped), not
# ceil(36 / 8) = 5; with 2 processes, the 2 whole batches of each one's 18 pairs; with 12 pairs over 2 processes, each
# one's 6 make one short batch, which is kept
@pytest.mark.parametrize("processes, pairs, steps", [(1, 36, 4), pytest.param(2, 36, 2, marks=pytest.mark.slow),
                                                     (2, 12, 1)])
def test_dpo_on_a_small_file_logs_its_metrics_and_steps_over_whole_batches(run_cli, rlhf_home, tmp_path, processes,
                                                                           pairs, steps):
    """A small file: fewer steps than trainer.log_every_n_steps (10) logged no train/* metric at all, and
    stage.offline.epochs=1 ran ceil(pairs / batch) steps over a loader that drops its last partial batch. Under DDP
    (2 processes on CPU) the steps were counted over all the pairs, so each process went through its share twice
    (36 pairs), or, with a share shorter than a batch dropped, trained nothing at all (12 pairs)."""
    import json
    import re

    import torch

    from framework.models import CausalLMFactory
    from framework.stages.common import export_causal_lm
    from plugins.datasets.chitchat import ChitchatCorpus
    from plugins.tokenizers.bpe import ByteLevelBPETrainer

    corpus = [t.text for t in ChitchatCorpus(max_documents=200).texts()]
    tok = ByteLevelBPETrainer(vocab_size=400).build(corpus, tmp_path / "tok")
    torch.manual_seed(0)
    policy = export_causal_lm(CausalLMFactory(arch="gpt2", n_layer=1, n_head=2, n_embd=32, n_positions=128).build(tok),
                              tok, tmp_path / "policy")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"how was day {i}?", "chosen": f"it was lovely, thanks {i}!",
                                         "rejected": f"bad {i}"}) + "\n" for i in range(pairs)))
    proc = run_cli("stage=rl", f"policy.path={policy}", "algo=dpo", "dataset=comparisons_jsonl",
                   f"dataset.paths=[{prefs}]", "stage.offline.batch_size=8", "stage.offline.epochs=1",
                   "stage.offline.val_fraction=0", "stage.offline.max_length=64", "trainer.enable_model_summary=false",
                   *(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"] if processes == 2 else []),
                   *QUIET, env={"OMP_NUM_THREADS": "1"} if processes == 2 else None)
    client, runs = mlflow_runs(rlhf_home)
    m = runs[0].data.metrics
    for key in ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "lr"):
        assert key in m, key
    ckpt = torch.load(exported_dir(proc.stdout).parent / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    assert ckpt["global_step"] == steps
    per_process = r" per process \(2 processes\)" if processes == 2 else ""
    assert re.search(rf"DPO: {pairs} train / 0 val pairs .* {steps} steps of 8 pairs{per_process} \(1 epoch\(s\) of "
                     rf"{steps} batches\)", proc.stdout), proc.stdout
