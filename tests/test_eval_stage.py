"""Best-of-n: the unbiased estimator against brute force over all n-subsets, the KL formula, and the stage."""

import itertools
import json
import math
import random
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from conftest import QUIET, mlflow_runs
from framework.errors import ConfigError, RLHFError
from framework.interfaces import RewardFunction
from framework.stages.eval import EvalStage, best_of_n, bon_kl, bon_weights
from plugins.tasks.chitchat_reply import FriendlyReply


def brute(proxy, gold, n):
    """Best-of-n over every n-subset; of samples tied at a subset's best proxy score, one at random (the mean)."""
    subsets = list(itertools.combinations(range(len(proxy)), n))
    proxies, golds = [], []
    for s in subsets:
        top = max(proxy[i] for i in s)
        tied = [i for i in s if proxy[i] == top]
        proxies.append(top)
        golds.append(sum(gold[i] for i in tied) / len(tied))
    return sum(proxies) / len(subsets), sum(golds) / len(subsets)


def test_best_of_n_estimator_matches_brute_force():
    assert best_of_n([0.1, 0.5, 0.3], [1.0, 2.0, 3.0], 2) == pytest.approx(((0.5 + 0.3 + 0.5) / 3, 7 / 3))
    rng = random.Random(0)
    for trial in range(40):
        k = rng.randint(1, 8)
        # half the trials draw from three values, so that proxy scores tie (a length-like proxy does)
        proxy = [rng.random() if trial % 2 else float(rng.randint(0, 2)) for _ in range(k)]
        gold = [rng.gauss(0, 1) for _ in range(k)]
        for n in range(1, k + 1):
            assert best_of_n(proxy, gold, n) == pytest.approx(brute(proxy, gold, n))
    # two tied best samples: either is best-of-2 as often, whatever their order
    assert best_of_n([1.0, 1.0, 0.0], [0.0, 5.0, 1.0], 2)[1] == pytest.approx((2.5 + 0.0 + 5.0) / 3)
    assert best_of_n([1.0, 1.0, 0.0], [5.0, 0.0, 1.0], 2)[1] == pytest.approx((2.5 + 5.0 + 0.0) / 3)
    assert sum(bon_weights(64, 16)) == pytest.approx(1.0)
    assert bon_kl(1) == 0.0 and bon_kl(64) == pytest.approx(math.log(64) - 63 / 64)
    with pytest.raises(ValueError):
        bon_weights(4, 5)


def test_eval_stage_reports_best_of_n(chat_model, run_cli, run_cli_here, rlhf_home):
    _, _, sft_dir, _ = chat_model
    proc = run_cli("stage=eval", f"policy.path={sft_dir}", "reward=sentiment", "stage.prompts=8",
                   "stage.samples_per_prompt=8", "stage.max_new_tokens=16", "bon.n=[1,2,8]", *QUIET)
    assert "best-of-n on 8 prompts x 8 samples" in proc.stdout
    client, runs = mlflow_runs(rlhf_home)
    run = runs[0]
    proxy = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "bon/proxy")}
    assert sorted(proxy) == [1, 2, 8] and proxy[1] <= proxy[2] <= proxy[8]  # best-of-n never lowers the proxy
    kl = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "bon/kl")}
    assert kl[8] == pytest.approx(math.log(8) - 7 / 8)
    assert {"best_of_n.json", "best_of_n.png", "samples.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    bad = run_cli_here("stage=eval", f"policy.path={sft_dir}", "reward=sentiment", "stage.samples_per_prompt=4",
                  "bon.n=[1,8]", check=False)
    assert bad.returncode != 0 and "bon.n" in bad.stderr


@pytest.mark.parametrize("settings, message", [
    ({"prompts": 0}, r"stage.prompts=0 must be >= 1"), ({"samples_per_prompt": 0}, r"stage.samples_per_prompt=0"),
    ({"max_new_tokens": 0}, r"stage.max_new_tokens=0 must be >= 1"), ({"batch_size": 0}, r"stage.batch_size=0"),
    ({"temperature": 0.0}, r"stage.temperature=0.0 must be > 0"),
])
def test_eval_sizes_that_cannot_work_are_refused_when_the_stage_is_built(settings, message):
    with pytest.raises(ConfigError, match=message):
        EvalStage(**{"samples_per_prompt": 8, "bon": {"n": [1]}, **settings})


def test_a_misspelt_bon_key_is_refused():
    with pytest.raises(ConfigError, match=r"unknown key bon.ns \(did you mean bon.n\?\): bon takes n"):
        EvalStage(samples_per_prompt=8, bon={"ns": [1, 2]})


def test_bon_sizes_are_sorted_without_repeats_and_start_at_one():
    assert EvalStage(samples_per_prompt=8, bon={"n": [4, 1, 2, 4]}).ns == [1, 2, 4]
    assert EvalStage(samples_per_prompt=8, bon={"n": [8, 2]}).ns == [1, 2, 8]  # n = 1: the base of the gains
    assert EvalStage(samples_per_prompt=8, bon={"n": 4}).ns == [1, 4]
    for bad, message in [([0, 2], r"every n must be in \[1, stage.samples_per_prompt=8\] \(0 is not\)"),
                         ([16], r"\(16 is not\); lower it or raise stage.samples_per_prompt"),
                         ([1, 2.5], r"whole numbers \(2.5 is not\)"), (["4"], "whole numbers"),
                         ([True], "whole numbers"), ([], "at least one")]:
        with pytest.raises(ConfigError, match=message):
            EvalStage(samples_per_prompt=8, bon={"n": bad})


# ----- the stage on a tiny policy, in process -------------------------------------------------------------------
class ReplyLength(RewardFunction):  # `reward._target_: test_eval_stage.ReplyLength`
    def score(self, prompts, completions):
        return [len(c) / 10 for c in completions]


class NaNOnFirst(RewardFunction):
    def score(self, prompts, completions):
        return [float("nan")] + [0.0] * (len(completions) - 1)


class InfGold(FriendlyReply):  # a task whose gold returns inf for the last two samples
    def golds(self, prompts, completions):
        return [0.0] * (len(completions) - 2) + [float("inf")] * 2


def run_eval(policy, tmp_path, reward="test_eval_stage.ReplyLength",
             task="plugins.tasks.chitchat_reply.FriendlyReply", n=(4, 1, 2)):
    logged = []
    client = SimpleNamespace(log_metric=lambda run_id, key, value, step: logged.append((key, step, value)),
                             log_artifact=lambda run_id, path: None)
    ctx = SimpleNamespace(cfg=OmegaConf.create({"seed": 0, "policy": {"path": policy}, "model": {},
                                                "task": {"_target_": task}, "reward": {"_target_": reward}}),
                          output_dir=tmp_path, run=SimpleNamespace(run_id="r", client=client,
                                                                   log_table=lambda data, name: None))
    stage = EvalStage(prompts=3, samples_per_prompt=4, max_new_tokens=6, batch_size=16, bon={"n": list(n)})
    return stage.run(ctx), logged


def test_unsorted_bon_sizes_report_the_largest_n_and_gains_over_n_1(tiny_policy, tmp_path, monkeypatch):
    """bon.n=[4,1,2] made n=4 the plot's base and n=2 the final metrics."""
    import framework.stages.eval as eval_stage

    plotted = []
    monkeypatch.setattr(eval_stage, "plot_bon", lambda rows, path: plotted.append(rows))
    result, logged = run_eval(tiny_policy, tmp_path)
    rows = json.loads((tmp_path / "eval" / "best_of_n.json").read_text())["rows"]
    assert [r["n"] for r in rows] == [1, 2, 4] and [r["n"] for r in plotted[0]] == [1, 2, 4]
    assert result.metrics == {"bon/proxy": rows[-1]["proxy"], "bon/gold": rows[-1]["gold"]}
    assert sorted(step for key, step, _ in logged if key == "bon/proxy") == [1, 2, 4]
    assert rows[0]["proxy"] <= rows[1]["proxy"] <= rows[2]["proxy"]
    monkeypatch.undo()  # the real plot takes rows in any order too (its base: the smallest n)
    eval_stage.plot_bon(list(reversed(rows)), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


@pytest.mark.parametrize("role, reward, task, count", [
    ("proxy", "test_eval_stage.NaNOnFirst", "plugins.tasks.chitchat_reply.FriendlyReply", 1),
    ("gold", "test_eval_stage.ReplyLength", "test_eval_stage.InfGold", 2)])
def test_a_non_finite_reward_names_the_reward_and_saves_the_samples(tiny_policy, tmp_path, role, reward, task, count):
    """It stopped with only "a reward returned NaN/inf on the evaluation samples"."""
    cls = {"proxy": "NaNOnFirst", "gold": r"TaskGold \(task InfGold\)"}[role]
    with pytest.raises(RLHFError, match=rf"the {role} reward {cls} returned NaN/inf for {count} of 12 samples "
                                        rf"\(saved in \S*nonfinite_rewards_eval_{role}.jsonl\)") as err:
        run_eval(tiny_policy, tmp_path, reward=reward, task=task)
    saved = tmp_path / f"nonfinite_rewards_eval_{role}.jsonl"
    assert str(saved) in str(err.value)
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert len(rows) == count and {"prompt", "completion", "reward"} == set(rows[0])
    assert rows[0]["reward"] == ("nan" if role == "proxy" else "inf") and rows[0]["prompt"]
    assert not (tmp_path / f"nonfinite_rewards_eval_{'gold' if role == 'proxy' else 'proxy'}.jsonl").exists()
    assert not (tmp_path / "eval" / "best_of_n.json").exists()


class OneNumber(RewardFunction):
    def score(self, prompts, completions):
        return 0.5


def test_a_reward_that_breaks_its_contract_is_named(tiny_policy, tmp_path):
    with pytest.raises(RLHFError, match="reward source OneNumber returned a float .*one real number per completion"):
        run_eval(tiny_policy, tmp_path, reward="test_eval_stage.OneNumber")


def test_a_policy_path_that_is_no_model_dir_is_named(tmp_path):
    """The setting that gave the path is named (it said `tokenizer path ... does not exist`)."""
    with pytest.raises(ConfigError, match=r"policy.path='/no/such/policy' does not exist locally"):
        run_eval("/no/such/policy", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"policy.path='.*empty' is a folder but not a Hugging Face model"):
        run_eval(str(tmp_path / "empty"), tmp_path)


def test_policy_path_names_the_setting_that_gave_it():
    from framework.stages.common import policy_path

    assert policy_path(OmegaConf.create({"policy": {"path": "/p"}, "model": {"path": "/m"}})) == ("/p", "policy.path")
    assert policy_path(OmegaConf.create({"policy": {"path": None}, "model": {"path": "/m"}})) == ("/m", "model.path")
    assert policy_path(OmegaConf.create({"model": {}})) == (None, "policy.path")


def _length_gold_task():  # a task whose gold is the proxy (test_eval_stage.ReplyLength): bon/gold == bon/proxy
    from plugins.tasks.chitchat_reply import FriendlyReply

    class Task(FriendlyReply):
        def golds(self, prompts, completions):
            return [len(c) / 10 for c in completions]

    return Task


LengthGoldTask = _length_gold_task()


def test_bon_gold_is_read_from_the_same_samples_as_the_proxy(tiny_policy, tmp_path):
    """Kills: the gold scores of prompt i sliced differently from its proxy scores (e.g. gold[i : i + k])."""
    import json

    run_eval(tiny_policy, tmp_path, reward="test_eval_stage.ReplyLength", task="test_eval_stage.LengthGoldTask")
    rows = json.loads((tmp_path / "eval" / "best_of_n.json").read_text())["rows"]
    assert len({r["proxy"] for r in rows}) > 1  # the samples differ in length: the check below can fail
    for r in rows:
        assert r["gold"] == pytest.approx(r["proxy"], abs=1e-12), r
