"""`experiment=dagger_vs_bc` end to end at a tiny size: the sweep runs and HorizonReport logs table + figure."""

import math

import pytest

from conftest import mlflow_runs
from plugins.experiments.horizon_report import loglog_slope, pool_seeds


def test_loglog_slope():
    assert loglog_slope([1, 2, 4, 8], [3, 6, 12, 24]) == pytest.approx(1.0)
    assert loglog_slope([1, 2, 4], [1, 4, 16]) == pytest.approx(2.0)
    assert loglog_slope([1], [1]) is None


def test_horizon_report_pools_seeds():
    """Runs of one (algorithm, T) with several seeds become one row: means, the spread of the mistakes, and the
    amplification of the means (defined while any seed has a token error)."""
    def run(algo, t, seed, mistakes, eps):
        return {"algorithm": algo, "T": t, "seed": seed, "seq_error": min(1.0, mistakes), "mistakes_per_seq": mistakes,
                "token_error_on_expert_states": eps, "expert_labels": 100.0 * t}

    rows = pool_seeds([run("BC", 16, 1, 4.0, 0.02), run("BC", 16, 2, 2.0, 0.0), run("DAgger", 16, 1, 0.1, 0.0),
                       run("BC", 32, 1, 8.0, 0.01)], tokens_per_step=2)
    assert [(r["algorithm"], r["T"], r["seeds"]) for r in rows] == [("BC", 16, 2), ("BC", 32, 1), ("DAgger", 16, 1)]
    bc16 = rows[0]
    assert bc16["mistakes_per_seq"] == pytest.approx(3.0) and bc16["mistakes_sd"] == pytest.approx(2 ** 0.5)
    assert bc16["token_error_on_expert_states"] == pytest.approx(0.01)
    assert bc16["amplification"] == pytest.approx(3.0 / (33 * 0.01))
    assert rows[1]["mistakes_sd"] == 0.0 and rows[1]["amplification"] == pytest.approx(8.0 / (65 * 0.01))
    assert rows[2]["amplification"] != rows[2]["amplification"]  # NaN: no seed erred on expert states
    assert bc16["mistakes_per_failure"] == pytest.approx(3.0 / 1.0) and rows[2]["mistakes_per_failure"] == pytest.approx(1.0)


def test_horizon_report_keeps_configurations_apart_and_survives_nan():
    """Runs that differ in anything but the seed (two DAgger variants, two budgets) are separate rows; a seed
    without a measure is left out of that measure's mean; a repeated seed is averaged with a warning."""
    def run(seed, mistakes, variant="mix", eps=0.01):
        return {"algorithm": "DAgger", "T": 16, "seed": seed, "seq_error": 0.5, "mistakes_per_seq": mistakes,
                "token_error_on_expert_states": eps, "expert_labels": 100.0,
                "config": {"imitation.rounds": variant, "task.length": "16"}}

    rows = pool_seeds([run(1, 2.0), run(2, 4.0), run(1, 1.0, "matched"), run(2, float("nan"), "matched")], 2)
    assert [(r["algorithm"], r["seeds"]) for r in rows] == [("DAgger [imitation.rounds=matched]", 2),
                                                           ("DAgger [imitation.rounds=mix]", 2)]
    matched, mix = rows
    assert matched["mistakes_per_seq"] == 1.0 and matched["mistakes_sd"] == 0.0  # the NaN seed left out
    assert mix["mistakes_per_seq"] == 3.0
    with pytest.warns(UserWarning, match="2 runs of 1 distinct seed"):
        (again,) = pool_seeds([run(1, 2.0), run(1, 4.0)], 2)
    assert again["seeds"] == 1 and again["mistakes_per_seq"] == 3.0
    (none,) = pool_seeds([run(1, float("nan")), run(2, float("nan"))], 2)
    assert math.isnan(none["mistakes_per_seq"]) and math.isnan(none["mistakes_sd"])


def test_metric_names_are_ones_mlflow_accepts():
    from plugins.experiments.sweep_report import metric_name

    assert metric_name("rl/3996_labels_5.9M/alpha") == "rl/3996_labels_5.9M/alpha"
    assert metric_name("rl//alpha") == "rl/alpha"
    assert metric_name("DAgger [imitation.rounds=3, dataset.n=200]/seq_error") == \
        "DAgger _imitation.rounds_3_ dataset.n_200_/seq_error"
    assert metric_name("rl/../x") == "rl/__/x"


def test_dagger_vs_bc_sweep_writes_a_report(run_cli, rlhf_home):
    proc = run_cli("experiment=dagger_vs_bc", "task.length=2,3", "dataset.n=60", "trainer.max_steps=24",
                   "trainer.val_check_interval=12", "stage.eval.prompts=20", "model.n_embd=32")
    assert "DAgger vs BC by horizon" in proc.stdout and "growth exponent" in proc.stdout
    assert [line.split()[:3] for line in proc.stdout.splitlines() if line.startswith(("BC ", "DAgger "))] == [
        ["BC", "2", "1"], ["BC", "3", "1"], ["DAgger", "2", "1"], ["DAgger", "3", "1"]]  # algorithm, T, seeds
    client, runs = mlflow_runs(rlhf_home)
    report = [r for r in runs if r.data.tags.get("stage") == "report"]
    jobs = [r for r in runs if r.data.tags.get("stage") == "sft"]
    assert len(report) == 1 and len(jobs) == 4
    assert {r.data.params["task.length"] for r in jobs} == {"2", "3"}
    steps = {m.step for m in client.get_metric_history(report[0].info.run_id, "BC/mistakes_per_seq")}
    assert steps == {2, 3}
    assert {"horizon_report.png", "horizon_report_table.json", "horizon_report.txt"} <= {
        a.path for a in client.list_artifacts(report[0].info.run_id)}


def test_dagger_vs_bc_drive_runs_with_its_environment(run_cli, rlhf_home):
    """The lane-keeping sweep composes, rolls DAgger out with the environment's observations forced in, and
    reports; each of the learner's episodes is 2T + 1 states (tokens_per_step: 2)."""
    proc = run_cli("experiment=dagger_vs_bc_drive", "task.length=3", "dataset.n=60", "trainer.max_steps=24",
                   "trainer.val_check_interval=12", "stage.eval.prompts=20", "model.n_embd=32")
    assert "DAgger vs BC by horizon" in proc.stdout
    client, runs = mlflow_runs(rlhf_home)
    jobs = [r for r in runs if r.data.tags.get("stage") == "sft"]
    assert len(jobs) == 2 and {r.data.params["task._target_"] for r in jobs} == {"plugins.tasks.drive.DriveLane"}
    dagger = [r for r in jobs if "dagger" in r.data.params["imitation._target_"].lower()][0]
    # every rollout of DAgger's rounds is labelled at its 2T + 1 states (actions, forced observations, the stop)
    assert dagger.data.metrics["imitation/expert_labels"] > 0 and 0.0 <= dagger.data.metrics["eval/gold"] <= 1.0


def test_overoptimization_fits_recover_known_coefficients():
    import math

    from plugins.experiments.overoptimization_report import fit_gold, fitted, gold_peak

    ds = [0.2 * k for k in range(1, 15)]
    bon = fit_gold(ds, [fitted(1.5, 0.6, "bon", d) for d in ds], "bon")
    assert bon == pytest.approx((1.5, 0.6))
    assert gold_peak(1.5, 0.6, "bon") == pytest.approx(1.25)
    rl = fit_gold(ds, [fitted(0.8, 0.3, "rl", d) for d in ds], "rl")
    assert rl == pytest.approx((0.8, 0.3))
    assert gold_peak(0.8, 0.3, "rl") == pytest.approx(math.exp(0.8 / 0.3 - 1))
    assert gold_peak(1.0, -0.1, "bon") is None and fit_gold([0.5], [0.1], "bon") is None


def test_overoptimization_report_pools_seeds(tmp_path):
    """Runs of several seeds per (method, proxy): one fit over all points, each seed's observed peak averaged
    (with its spread), and the curve averaged per evaluation."""
    from omegaconf import OmegaConf

    from plugins.experiments.overoptimization_report import OveroptimizationReport, fitted, mean_curve

    def run(seed, alpha, stretch):
        return [{"seed": seed, "step": k, "kl": (stretch * 0.5 * k) ** 2, "d": stretch * 0.5 * k,
                 "gold_gain": fitted(alpha, 0.3, "rl", stretch * 0.5 * k), "proxy_gain": 0.1 * k} for k in range(8)]

    pts = run("0", 0.8, 1.0) + run("1", 0.9, 1.2)
    mean = mean_curve(pts)
    assert [p["step"] for p in mean] == list(range(8)) and all(p["seeds"] == 2 for p in mean)
    assert mean[3]["d"] == pytest.approx((1.5 + 1.8) / 2) and mean[3]["gold_gain_sd"] > 0
    published = {}

    class Report(OveroptimizationReport):
        def curves(self, config):
            return {("rl", "250 labels"): sorted(pts, key=lambda p: p["d"])}

        def publish(self, config, rows, lines, png, metrics, extra=None):
            published.update(rows=rows, metrics={m[0] for m in metrics}, png=png)

    Report().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    row = published["rows"][0]
    assert row["seeds"] == 2 and row["points"] == 16
    peaks = [max(run(s, a, k), key=lambda p: p["gold_gain"]) for s, a, k in (("0", 0.8, 1.0), ("1", 0.9, 1.2))]
    assert row["best_observed_d"] == pytest.approx((peaks[0]["d"] + peaks[1]["d"]) / 2)
    assert row["best_observed_d_sd"] > 0
    assert row["max_gold_gain"] == pytest.approx((peaks[0]["gold_gain"] + peaks[1]["gold_gain"]) / 2)
    assert "rl/250_labels/observed_peak_d" in published["metrics"] and published["png"].is_file()
    assert row["fall_after_peak"] == 0.0  # both seeds still rising at their last evaluation

    # one seed peaks at its second evaluation and loses 0.6 by its last (listed by d, not by step), one never falls
    falling = [{"seed": "0", "step": k, "kl": d * d, "d": d, "gold_gain": g, "proxy_gain": k}
               for k, d, g in ((0, 0.0, 0.0), (2, 2.5, 0.4), (1, 3.0, 1.0))]
    rising = [{"seed": "1", "step": k, "kl": k, "d": k ** 0.5, "gold_gain": 0.2 * k, "proxy_gain": k} for k in range(3)]
    pts = sorted(falling + rising, key=lambda p: p["d"])
    Report().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    row = published["rows"][0]
    assert row["fall_after_peak"] == pytest.approx(0.3) and row["fall_after_peak_max"] == pytest.approx(0.6)
    assert row["fall_after_peak_sd"] == pytest.approx(0.6 / 2 ** 0.5)
    assert "rl/250_labels/fall_after_peak" in published["metrics"]


def test_report_lists_proxies_by_budget():
    from plugins.experiments.overoptimization_report import label_order

    keys = [("rl", "TaskGold"), ("rl", "1000 labels 1.4M"), ("rl", "250 labels 1.4M"), ("bon", "500 labels"),
            ("rl", "100 labels 5.9M")]
    assert sorted(keys, key=label_order) == [("bon", "500 labels"), ("rl", "100 labels 5.9M"), ("rl", "250 labels 1.4M"),
                                             ("rl", "1000 labels 1.4M"), ("rl", "TaskGold")]


def test_a_sweep_can_be_pooled_with_an_earlier_one_by_its_tag():
    """logger.tags.sweep=<an earlier sweep's folder> makes a report read that sweep's runs with its own."""
    from omegaconf import OmegaConf

    from plugins.experiments.sweep_report import SweepReport

    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": "/runs/new"}}, "logger": {"tags": {"sweep": "${hydra:sweep.dir}"}}})
    assert SweepReport.sweep_tag(cfg) == "/runs/new"  # the default interpolation: this sweep's own folder
    cfg.logger.tags.sweep = "/runs/earlier"
    assert SweepReport.sweep_tag(cfg) == "/runs/earlier"
    del cfg.logger["tags"]
    assert SweepReport.sweep_tag(cfg) == "/runs/new"


def test_proxy_label_names_budget_and_size(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    from plugins.experiments.overoptimization_report import proxy_label, reward_label

    rm = tmp_path / "rm_250" / "reward_model"
    rm.mkdir(parents=True)
    (rm / "config.json").write_text(json.dumps({"rlhf_reward": {"train_comparisons": 250}}))
    save_file({"trunk": torch.zeros(1000, 1000), "head": torch.zeros(500, 1000)}, str(rm / "model.safetensors"))
    assert proxy_label(str(rm)) == "250 labels 1.5M"
    bare = tmp_path / "rm_x" / "reward_model"
    bare.mkdir(parents=True)
    assert proxy_label(str(bare)) == "rm_x"  # no config, no weights: the run folder's name
    assert reward_label({"reward.path": str(rm), "reward._target_": "plugins.rewards.learned.LearnedReward"}) == \
        "250 labels 1.5M"
    assert reward_label({"reward._target_": "plugins.rewards.gold.TaskGold"}) == "TaskGold"  # the gold control
    ensemble = {"reward._target_": "plugins.rewards.learned.RewardEnsemble", "reward.aggregate": "min",
                "reward.paths": repr([str(rm), str(bare)])}
    assert reward_label(ensemble) == "ensemble min of 250 labels 1.5M + rm_x"


def test_overoptimization_sweep_writes_a_report(chat_model, run_cli, rlhf_home):
    from conftest import QUIET, exported_dir

    _, _, sft_dir, _ = chat_model
    rm = run_cli("stage=reward_model", f"model.path={sft_dir}", "labeller/gold=length", "dataset.n=60",
                 "stage.max_length=128", "stage.normalize.samples=16", "trainer.val_check_interval=5", *QUIET)
    rm_dir = exported_dir(rm.stdout, "reward model")
    proc = run_cli("experiment=overoptimization", f"policy.path={sft_dir}", f"reward.path={rm_dir}",
                   "overopt.max_new_tokens=8", "overopt.prompts=4", "overopt.bon_samples=4", "bon.n=[1,2,4]",
                   "overopt.rl_iterations=2", "overopt.rl_prompts_per_iteration=4", "overopt.rl_eval_every=1")
    assert "over-optimisation: gold and proxy gain" in proc.stdout, proc.stdout[-2000:]
    client, runs = mlflow_runs(rlhf_home)
    report = [r for r in runs if r.data.tags.get("stage") == "report"]
    assert len(report) == 1
    assert {r.data.tags["stage"] for r in runs} == {"reward_model", "rl", "eval", "report"}
    artifacts = {a.path for a in client.list_artifacts(report[0].info.run_id)}
    assert {"overoptimization.png", "overoptimization_table.json"} <= artifacts
    assert any(k.startswith(("rl/", "bon/")) and "labels" in k for k in report[0].data.metrics)

    # task=rm_gold with that reward model as the gold and as the proxy: best-of-n's gold is its proxy, at every n
    run_cli("stage=eval", f"policy.path={sft_dir}", "task=rm_gold", f"task.path={rm_dir}", f"reward.path={rm_dir}",
            "stage.prompts=4", "stage.samples_per_prompt=4", "stage.max_new_tokens=8", "bon.n=[1,2,4]", *QUIET)
    client, runs = mlflow_runs(rlhf_home)
    run = runs[0]
    assert run.data.tags["stage"] == "eval"
    gold, proxy = ({m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in ("bon/gold", "bon/proxy"))
    assert sorted(gold) == [1, 2, 4] and gold == pytest.approx(proxy)
    assert gold[4] > gold[1]  # best-of-4 by the gold itself beats a random sample
