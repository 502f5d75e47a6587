"""`experiment=dagger_vs_bc` end to end at a tiny size: the sweep runs and HorizonReport logs table + figure."""

import pytest

from conftest import mlflow_runs
from plugins.experiments.horizon_report import loglog_slope


def test_loglog_slope():
    assert loglog_slope([1, 2, 4, 8], [3, 6, 12, 24]) == pytest.approx(1.0)
    assert loglog_slope([1, 2, 4], [1, 4, 16]) == pytest.approx(2.0)
    assert loglog_slope([1], [1]) is None


def test_dagger_vs_bc_sweep_writes_a_report(run_cli, rlhf_home):
    proc = run_cli("experiment=dagger_vs_bc", "task.length=2,3", "dataset.n=60", "trainer.max_steps=24",
                   "trainer.val_check_interval=12", "stage.eval.prompts=20", "model.n_embd=32")
    assert "DAgger vs BC by horizon" in proc.stdout and "growth exponent" in proc.stdout
    client, runs = mlflow_runs(rlhf_home)
    report = [r for r in runs if r.data.tags.get("stage") == "report"]
    jobs = [r for r in runs if r.data.tags.get("stage") == "sft"]
    assert len(report) == 1 and len(jobs) == 4
    assert {r.data.params["task.length"] for r in jobs} == {"2", "3"}
    steps = {m.step for m in client.get_metric_history(report[0].info.run_id, "BC/mistakes_per_seq")}
    assert steps == {2, 3}
    assert {"horizon_report.png", "horizon_report_table.json", "horizon_report.txt"} <= {
        a.path for a in client.list_artifacts(report[0].info.run_id)}
