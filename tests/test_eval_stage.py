"""Best-of-n: the unbiased estimator against brute force over all n-subsets, the KL formula, and the stage."""

import itertools
import math
import random

import pytest

from conftest import QUIET, mlflow_runs
from framework.stages.eval import best_of_n, bon_kl, bon_weights


def brute(proxy, gold, n):
    subsets = list(itertools.combinations(range(len(proxy)), n))
    best = [max(s, key=lambda i: (proxy[i], -i)) for s in subsets]
    return sum(proxy[i] for i in best) / len(best), sum(gold[i] for i in best) / len(best)


def test_best_of_n_estimator_matches_brute_force():
    assert best_of_n([0.1, 0.5, 0.3], [1.0, 2.0, 3.0], 2) == pytest.approx(((0.5 + 0.3 + 0.5) / 3, 7 / 3))
    rng = random.Random(0)
    for _ in range(20):
        k = rng.randint(1, 8)
        proxy = [rng.random() for _ in range(k)]
        gold = [rng.gauss(0, 1) for _ in range(k)]
        for n in range(1, k + 1):
            assert best_of_n(proxy, gold, n) == pytest.approx(brute(proxy, gold, n))
    assert sum(bon_weights(64, 16)) == pytest.approx(1.0)
    assert bon_kl(1) == 0.0 and bon_kl(64) == pytest.approx(math.log(64) - 63 / 64)
    with pytest.raises(ValueError):
        bon_weights(4, 5)


def test_eval_stage_reports_best_of_n(chat_model, run_cli, rlhf_home):
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
    bad = run_cli("stage=eval", f"policy.path={sft_dir}", "reward=sentiment", "stage.samples_per_prompt=4",
                  "bon.n=[1,8]", check=False)
    assert bad.returncode != 0 and "bon.n" in bad.stderr
