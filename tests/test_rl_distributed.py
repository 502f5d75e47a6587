"""The RL stage under data parallelism (DDP, 2 processes on CPU over gloo): an iteration's rollout is split over the
processes, and what is computed over the rollout (advantage whitening, REINFORCE's running baseline, RLOO's
normalisation, the adaptive KL controller, the logged means) is computed over all of it, so that every process
holds the same state and the logs describe the whole rollout. A non-finite reward on one process stops all of them
with one message, each process's samples saved."""

import json
import math
import os

import pytest
import torch

from conftest import QUIET, mlflow_runs


def _shares(rank: int):
    """Process `rank`'s half of a rollout of 6 sequences (3 each) with ragged masks."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3 + 1
    mask = torch.ones(6, 5)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    mask[5, 4:] = 0
    rows = slice(3 * rank, 3 * rank + 3)
    return x, mask, x[rows], mask[rows], rows


def _collectives(rank: int, world: int, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                                         world_size=world)
    try:
        from framework.distributed import (FailedElsewhere, failing_together, over_processes, per_process,
                                           was_raised_everywhere)
        from framework.interfaces import Rollout
        from framework.reward import NonFiniteReward, checked_scores
        from framework.rl import rollout_mean, rollout_moments, whiten
        from plugins.algorithms.group import RLOO, Reinforce

        x, mask, x_mine, mask_mine, rows = _shares(rank)
        result = {"whiten": whiten(x_mine, mask_mine).tolist(), "rows": [rows.start, rows.stop],
                  "kept": whiten(x_mine, mask_mine, shift_mean=False).tolist(),
                  "mean": float(rollout_mean(x_mine, mask_mine)), "unmasked": float(rollout_mean(x_mine)),
                  "moments": [float(v) for v in rollout_moments(x_mine[:, 0], unbiased=True)]}

        def rollout(scores):
            n = len(scores)
            zeros = torch.zeros(n, 2)
            return Rollout(prompts=[], texts=[], query_ids=zeros.long(), query_mask=zeros.long(),
                           response_ids=zeros.long(), response_mask=torch.ones(n, 2), logprobs=zeros, ref_logprobs=zeros,
                           values=None, scores=torch.tensor(scores), raw_scores=torch.tensor(scores),
                           ended=torch.ones(n, dtype=torch.bool), group_size=2)

        reinforce = Reinforce()
        for scores in ([1.0, 2.0], [5.0, 7.0]) if rank == 0 else ([3.0, 6.0], [4.0, 4.0]):
            reinforce.make_experience(rollout(scores), 0.0, "k1")
        result["baseline"] = reinforce.baseline
        rloo = RLOO(generations=2, normalize_advantages=True)
        result["rloo"] = rloo.make_experience(rollout([1.0, 4.0] if rank == 0 else [2.0, 2.5]), 0.0, "k1")[
            "advantages"][:, 0].tolist()
        result["logs"] = over_processes({"a": 1.0 + rank, "time/x": 10.0 * (rank + 1), "b": 4.0})
        result["per_process"] = per_process(rank + 0.5)

        class Source:
            def score(self, prompts, texts):
                return [float("nan") if rank == 1 and i == 1 else 1.0 for i in range(len(texts))]

        try:
            checked_scores(Source(), ["p"] * 3, ["a", "b", "c"], os.path.join(out_dir, "bad.jsonl"), "at iteration 4",
                           "Nothing was updated", all_processes=True)
            result["raised"] = None
        except NonFiniteReward as err:
            result["raised"], result["echoed_by_rank"] = str(err), err.echoed_by_rank

        class Broken:
            def score(self, prompts, texts):
                if rank == 1:
                    raise ValueError("the scorer broke")
                return [1.0] * len(texts)

        try:
            checked_scores(Broken(), ["p"] * 3, ["a", "b", "c"], os.path.join(out_dir, "broken.jsonl"),
                           "at iteration 5", "", all_processes=True)
            result["broken"] = None
        except (ValueError, FailedElsewhere) as err:
            result["broken"] = [type(err).__name__, str(err), getattr(err, "echoed_by_rank", None),
                                was_raised_everywhere(err)]
        try:
            with failing_together("in the evaluation"):
                pass
            result["quiet"] = "went on"
        except FailedElsewhere:
            result["quiet"] = "stopped"
        try:
            over_processes({"a": 1.0} if rank == 0 else {"b": 1.0})
            result["keys"] = None
        except RuntimeError as err:
            result["keys"] = str(err)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


def test_rollout_statistics_are_the_whole_rollouts_under_two_processes(tmp_path):
    """Each process holds half a rollout; whitening, the masked mean and variance, REINFORCE's baseline, RLOO's
    normalisation and the logged means come out as one process holding all of it computes them."""
    import torch.multiprocessing as mp

    from framework.rl import masked_mean, whiten

    mp.spawn(_collectives, args=(2, str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    x, mask, *_ = _shares(0)
    whole, kept = whiten(x, mask), whiten(x, mask, shift_mean=False)
    for r in got:
        rows = slice(*r["rows"])
        assert torch.allclose(torch.tensor(r["whiten"], dtype=torch.float64), whole[rows], atol=1e-6)
        assert torch.allclose(torch.tensor(r["kept"], dtype=torch.float64), kept[rows], atol=1e-6)
        assert r["mean"] == pytest.approx(float(masked_mean(x, mask)))
        assert r["unmasked"] == pytest.approx(float(x.mean()))
        assert r["moments"] == pytest.approx([float(x[:, 0].mean()), float(x[:, 0].var())])
        # the mean over both processes: (1+2+3+6)/4 = 3 starts the baseline, then 0.9*3 + 0.1*(5+7+4+4)/4 (each process
        # alone would hold 1.95 and 4.05)
        assert r["baseline"] == pytest.approx(0.9 * 3.0 + 0.1 * 5.0)
        assert r["logs"] == {"a": 1.5, "b": 4.0, "time/x": 20.0}
        assert r["per_process"] == [0.5, 1.5]
    # RLOO's leave-one-out advantages (-3, 3) and (-0.5, 0.5), normalised over all four together
    adv = torch.tensor([-3.0, 3.0, -0.5, 0.5])
    want = (adv - adv.mean()) / (adv.std() + 1e-8)
    assert got[0]["rloo"] + got[1]["rloo"] == pytest.approx(want.tolist(), abs=1e-6)
    # a non-finite score on process 1 stops both, with the same message, printed once (by rank 0)
    assert got[0]["raised"] == got[1]["raised"] and "1 of 3 samples on process 1" in got[0]["raised"]
    assert str(tmp_path / "bad_rank1.jsonl") in got[0]["raised"] and "Nothing was updated" in got[0]["raised"]
    assert [got[0]["echoed_by_rank"], got[1]["echoed_by_rank"]] == [0, 1]
    assert [json.loads(line)["completion"] for line in (tmp_path / "bad_rank1.jsonl").read_text().splitlines()] == ["b"]
    assert not (tmp_path / "bad_rank0.jsonl").exists()
    # a reward source that fails on process 1: it raises its own error, process 0 says so, once; both errors are
    # marked as a stop every process took (only then may the stop save a checkpoint: saving ends in a barrier)
    assert got[1]["broken"] == ["ValueError", "the scorer broke", None, True]
    assert got[0]["broken"] == ["FailedElsewhere", "process 1 of 2 stopped in its reward source at iteration 5; its "
                                "error is above", 0, True]
    assert got[0]["quiet"] == got[1]["quiet"] == "went on"
    # metric names that differ between processes are refused on both, not mixed
    assert "process 0 has ['a']" in got[0]["keys"] and "process 1 has ['b']" in got[1]["keys"]


RECORDING = '''
import json, os

import torch

from framework.interfaces import RewardFunction
from framework.rl import masked_mean
from plugins.algorithms.ppo import PPO


def _record(name, row):
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    with open(os.path.join(os.environ["RECORD_DIR"], f"{name}{rank}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\\n")


class RecordingPPO(PPO):
    """PPO that writes, per process and iteration, the KL coefficient it was given and its whitened advantages."""

    def make_experience(self, rollout, kl_coef, kl_estimator):
        out = super().make_experience(rollout, kl_coef, kl_estimator)
        mask = out["mask"]
        _record("ppo", {"kl_coef": kl_coef, "advantages": out["advantages"].tolist(), "mask": mask.tolist(),
                        "raw": (out["returns"] - rollout.values * mask).tolist(), "seq_kl": out["seq_kl"].tolist()})
        return out


class Lengths(RewardFunction):
    """The completion's length in characters, / 10; NaN for one sample on process 1 from its call $NAN_AT on (an
    environment variable: a resumed run needs the same config)."""

    def __init__(self):
        self.calls, self.nan_at = 0, int(os.environ.get("NAN_AT", "1000"))

    def score(self, prompts, completions):
        self.calls += 1
        scores = [len(c) / 10 for c in completions]
        if os.environ.get("LOCAL_RANK") == "1" and self.calls >= self.nan_at:
            scores[0] = float("nan")
        _record("reward", {"scores": scores})
        return scores
'''


ITERATIONS = 6


def stopped_run(tmp_path, sft_dir, run_cli):
    """PPO (recording its experience) with the adaptive KL controller on 2 processes, DDP on CPU, whose reward gives
    a NaN on process 1 at the last iteration: (the command's overrides, its environment, the CompletedProcess)."""
    (tmp_path / "recording.py").write_text(RECORDING)
    records = tmp_path / "records"
    records.mkdir()
    iterations = ITERATIONS
    args = ["stage=rl", f"policy.path={sft_dir}", "algo=ppo", "algo._target_=recording.RecordingPPO",
            "algo.minibatches=2", "algo.epochs=1", "kl=adaptive", "kl.target=1e-4", "kl.horizon=40", "reward=gold",
            "~reward.task", "reward._target_=recording.Lengths", f"stage.iterations={iterations}",
            "stage.prompts_per_iteration=4", "stage.max_new_tokens=12", "stage.eval.prompts=0", "trainer=ddp",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.enable_model_summary=false", *QUIET]
    env = {"PYTHONPATH": str(tmp_path), "RECORD_DIR": str(records), "OMP_NUM_THREADS": "1"}
    return args, env, run_cli(*args, env={**env, "NAN_AT": str(iterations)}, check=False)


def test_ppo_over_two_processes_shares_one_state_and_logs_the_whole_rollout(tmp_path, chat_model, run_cli, rlhf_home):
    """PPO with the adaptive KL controller on 2 processes (DDP on CPU): every process is given the same KL
    coefficient each iteration, and it moves; the advantages are whitened over both processes' tokens; the logged
    scores and KL are both processes' means, the episodes both processes'. A NaN reward on process 1 at the last
    iteration stops both with one message (exit 2), its samples saved under process 1's name."""
    from framework.rl import whiten

    _, _, sft_dir, _ = chat_model
    iterations, records = ITERATIONS, tmp_path / "records"
    _, _, proc = stopped_run(tmp_path, sft_dir, run_cli)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("error: ") == 1, proc.stderr[-3000:]
    assert f"at iteration {iterations - 1}: 1 of 4 samples on process 1, saved in " in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    ppo = [[json.loads(line) for line in (records / f"ppo{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    rewards = [[json.loads(line)["scores"] for line in (records / f"reward{r}.jsonl").read_text().splitlines()]
               for r in (0, 1)]
    done = iterations - 1  # the last iteration stopped at its rewards, before any update
    assert len(ppo[0]) == len(ppo[1]) == done
    coefs = [[row["kl_coef"] for row in p] for p in ppo]
    assert coefs[0] == coefs[1]  # the same on both processes
    for it in range(1, done):  # Ziegler's update from the KL over both processes' samples: with a target this
        # small, e = +0.2 or -0.2 by the sign of the mean k1 KL, which a process's own half may not share
        seq_kl = ppo[0][it - 1]["seq_kl"] + ppo[1][it - 1]["seq_kl"]
        error = min(max(sum(seq_kl) / len(seq_kl) / 1e-4 - 1, -0.2), 0.2)
        assert coefs[0][it] == pytest.approx(coefs[0][it - 1] * (1 + error * 8 / 40))
    for it in range(done):  # whitened over both processes' tokens together
        raw = torch.tensor(ppo[0][it]["raw"] + ppo[1][it]["raw"])
        mask = torch.tensor(ppo[0][it]["mask"] + ppo[1][it]["mask"])
        got = torch.tensor(ppo[0][it]["advantages"] + ppo[1][it]["advantages"])
        assert torch.allclose(got, whiten(raw, mask), atol=1e-4)
    client, runs = mlflow_runs(rlhf_home)
    run = runs[0]

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    scores, kl, episodes = history("objective/raw_scores"), history("objective/kl"), history("episodes")
    assert sorted(scores) == list(range(done))
    for it in range(done):
        both = rewards[0][it] + rewards[1][it]
        assert scores[it] == pytest.approx(sum(both) / len(both), abs=1e-6)
        seq_kl = ppo[0][it]["seq_kl"] + ppo[1][it]["seq_kl"]
        assert kl[it] == pytest.approx(sum(seq_kl) / len(seq_kl), abs=1e-6)
        assert episodes[it] == 2 * 4 * (it + 1)
    assert history("objective/kl_coef") == dict(enumerate(coefs[0]))
    saved = list(rlhf_home.rglob(f"nonfinite_rewards_iter{done}_rank1.jsonl"))
    assert len(saved) == 1 and not list(rlhf_home.rglob("nonfinite_rewards_iter*_rank0.jsonl"))
    assert math.isnan(float(json.loads(saved[0].read_text().splitlines()[0])["reward"]))



@pytest.mark.slow
def test_a_ppo_run_over_two_processes_stopped_by_a_nan_resumes_to_the_metrics_of_one_never_stopped(
        tmp_path, chat_model, run_cli, rlhf_home):
    """`resume=true` after the NaN stop finishes the run with the metrics of a run that was never stopped, every
    iteration: rank 0's checkpoint holds every process's state (KL coefficient, algorithm state, episodes)."""
    _, _, sft_dir, _ = chat_model
    args, env, proc = stopped_run(tmp_path, sft_dir, run_cli)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (tmp_path / "records").rename(tmp_path / "records_stopped")
    (tmp_path / "records").mkdir()
    resumed = run_cli(*args, "resume=true", env=env)
    assert "resuming from" in resumed.stdout
    straight_home = rlhf_home.parent / "straight"
    run_cli(*args, env={**env, "RLHF_HOME": str(straight_home)})
    keys = ("objective/scores", "objective/kl", "objective/kl_coef", "loss/policy", "loss/value", "lr", "episodes")
    client, runs = mlflow_runs(rlhf_home)
    assert len(runs) == 1  # the resumed run went on in the stopped one's MLflow run
    straight_client, straight_runs = mlflow_runs(straight_home)
    for key in keys:
        want = {m.step: m.value for m in straight_client.get_metric_history(straight_runs[0].info.run_id, key)}
        got = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}
        assert sorted(got) == sorted(want) == list(range(ITERATIONS)), key
        for step in range(ITERATIONS):
            assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-7), (key, step)
