"""The benchmarks' command lines refuse what they cannot measure with a clear message, before any work starts, and
the PPO benchmark scores both sides with one function."""

import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO

BENCH = REPO / "benchmarks"


def bench(script: str, *args: str, root=None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"TRL_BENCH_ROOT": str(root)} if root else {})}
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_rl_throughput_refuses_runs_too_short_to_time():
    out = bench("rl_throughput.py", "--algo", "ppo", "--steps", "10")
    assert out.returncode == 2
    assert "--steps 10: at least 20" in out.stderr


@pytest.mark.parametrize("option", [["--ppo-kl", "0"], ["--ppo-prompts", "64"], ["--bf16"], ["--ppo-shared-critic"]])
def test_rl_throughput_ppo_options_need_ppo(option):
    out = bench("rl_throughput.py", "--algo", "grpo", *option)
    assert out.returncode == 2
    assert "are for --algo ppo" in out.stderr


@pytest.mark.parametrize("prompts", ["0", "18"])
def test_ppo_prompts_split_into_four_minibatches(prompts):
    out = bench("rl_throughput.py", "--algo", "ppo", "--ppo-prompts", prompts)
    assert out.returncode == 2
    assert f"--ppo-prompts {prompts}: a positive multiple of 4" in out.stderr
    out = bench("trl_ppo_peer.py", "--prompts", prompts)  # the TRL side, run on its own
    assert out.returncode == 2
    assert f"--prompts {prompts}: a positive multiple of 4" in out.stderr


def test_rl_throughput_dpo_has_no_seeds_to_vary():
    out = bench("rl_throughput.py", "--algo", "dpo", "--seeds")
    assert out.returncode == 2
    assert "--seeds is for the on-policy algorithms" in out.stderr


@pytest.mark.parametrize("script", ["rl_throughput.py", "ppo_update_floor.py", "sft_throughput.py"])
@pytest.mark.parametrize("value, message", [("0", "0: at least 1"), ("two", "'two' is not a whole number")])
def test_repeats_must_be_a_positive_whole_number(script, value, message):
    out = bench(script, "--repeats", value)
    assert out.returncode == 2
    assert f"argument --repeats: {message}" in out.stderr


def test_update_floor_names_the_missing_reward_model_and_how_to_make_it(tmp_path):
    out = bench("ppo_update_floor.py", root=tmp_path)
    assert out.returncode == 1
    assert f"no reward model at {tmp_path / 'out' / 'rm_model'}" in out.stderr
    assert "rl_throughput.py --algo ppo" in out.stderr


def test_fraction_of_a_counts_non_space_characters():
    spec = importlib.util.spec_from_file_location("rl_throughput_under_test", BENCH / "rl_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.fraction_of_a(["a a b", "aaaa", "", "   ", "bcd"]) == [2 / 3, 1.0, 0.0, 0.0, 0.0]
    # the TRL PPO harness scores with this same function, not a copy of it
    assert "from rl_throughput import fraction_of_a" in (BENCH / "trl_ppo_peer.py").read_text()


def test_reward_curves_refuse_what_they_cannot_summarise_and_name_the_missing_trl_venv(tmp_path):
    out = bench("ppo_reward_curves.py", "--steps", "10")
    assert out.returncode == 2 and "--steps >= 20" in out.stderr
    out = bench("ppo_reward_curves.py", "--seeds", "1")
    assert out.returncode == 2 and "--seeds >= 2" in out.stderr
    out = bench("ppo_reward_curves.py", root=tmp_path)
    assert out.returncode == 2 and f"{tmp_path / 'venv112'} is missing" in out.stderr and "--rows" in out.stderr
    out = bench("ppo_reward_curves.py", "--rows", "separate", root=tmp_path)  # its critic starts from the peer's RM
    assert out.returncode == 2 and f"no reward model at {tmp_path / 'out' / 'rm_model'}" in out.stderr
    assert "--rows shared" in out.stderr


def test_reward_curves_permutation_p_value():
    spec = importlib.util.spec_from_file_location("ppo_reward_curves_under_test", BENCH / "ppo_reward_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.permutation_p([0.5, 0.6, 0.7], [0.7, 0.5, 0.6]) == 1.0  # the same values: nothing to tell apart
    # 5 against 5 fully apart: 2 of the 252 labellings are as extreme, p = 2/252 up to the sampling of 20000 draws
    p = module.permutation_p([0.1, 0.11, 0.12, 0.13, 0.14], [0.6, 0.61, 0.62, 0.63, 0.64])
    assert 0.005 < p < 0.012
    assert module.permutation_p([0.1, 0.2], [0.3, 0.4]) == module.permutation_p([0.1, 0.2], [0.3, 0.4])  # seeded


def test_reward_curve_figures_in_the_docs_are_the_stored_runs():
    """docs/benchmarks.md's ten-seed PPO tables, p-values and one-off diagnostics (vf_coef, a zeroed value layer), its
    twenty-seed comparison of the cut critics with TRL, and the README's and rl.md's figures, are what
    docs/data/ppo_reward_curves_kl0*.jsonl hold."""
    import json
    import statistics

    spec = importlib.util.spec_from_file_location("ppo_reward_curves_docs", BENCH / "ppo_reward_curves.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = REPO / "docs" / "data"
    runs = [json.loads(line) for name in ("ppo_reward_curves_kl0.jsonl", "ppo_reward_curves_kl0_vf001.jsonl",
                                          "ppo_reward_curves_kl0_zero_value.jsonl", "ppo_reward_curves_kl0_cut_scoring.jsonl",
                                          "ppo_reward_curves_kl0_cut1_ridge.jsonl")
            for line in (data / name).read_text().splitlines()]
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    summaries = (REPO / "README.md").read_text() + (REPO / "docs" / "rl.md").read_text()

    def curves_of(row, seeds=10):
        curves = [r["rewards"] for r in sorted(runs, key=lambda r: r["seed"]) if r["row"] == row and r["seed"] < seeds]
        assert len(curves) == seeds and all(len(c) == 150 for c in curves), row
        return curves

    def against_trl(curves, trl):  # the cells of a row's window table against TRL's, with p-values
        cells = []
        for w in module.windows(150):
            ours, theirs = ([statistics.mean(c[w.start:w.stop]) for c in cs] for cs in (curves, trl))
            cells.append(f"{statistics.mean(ours) - statistics.mean(theirs):+.3f} "
                         f"(p {module.p_text(module.permutation_p(ours, theirs))})")
        return " | ".join(cells) + " |"

    area, last = {}, {}
    one_off = ("shared_vf0.01", "separate_zero")  # the diagnostics' rows: their summaries only
    for row in ("shared", "branch1", "branch2", "separate", "cut1_scoring", "cut2_scoring", "trl", *one_off):
        curves = curves_of(row)
        area[row], last[row] = [statistics.mean(c) for c in curves], [statistics.mean(c[-10:]) for c in curves]
        assert f"{module.summary(area[row])} ".replace("+-", "±") in docs
        assert f"{module.summary(last[row])} ".replace("+-", "±") in docs
        if row not in one_off:
            assert f"| {', '.join(f'{x:.3f}' for x in last[row])} |" in docs
            cells = [statistics.mean(statistics.mean(c[w.start:w.stop]) for c in curves) for w in module.windows(150)]
            assert " | ".join(f"{x:.3f}" for x in cells) + " |" in docs
        assert f"{statistics.mean(area[row]):.3f}" in summaries or row in (*one_off, "branch1", "branch2",
                                                                           "cut1_scoring", "cut2_scoring")
        if row not in ("trl", *one_off):
            assert against_trl(curves, curves_of("trl")) in docs, row
    assert f"{statistics.mean(last['branch1']):.3f} against {statistics.mean(last['trl']):.3f}" in summaries
    for a, b, told in (("separate", "trl", "p = 0.61"), ("shared", "trl", "p = 0.052"),
                       ("shared", "separate", "p = 0.021"), ("shared_vf0.01", "shared", "p = 0.75"),
                       ("branch1", "branch2", "p = 0.66"), ("separate_zero", "trl", "p = 0.64"),
                       ("cut1_scoring", "trl", "p = 0.86"), ("cut2_scoring", "trl", "p = 0.25")):
        p = module.permutation_p(area[a], area[b])
        assert told in docs and round(p, len(told) - 6) == float(told[4:]), (a, b, p)
    # twenty seeds of the cut critics and TRL's: the scoring-layer starts, then the flat start (the setting) and the
    # ridge refit
    trl = curves_of("trl", 20)
    for row, label in (("cut1_scoring", "`cut1_scoring`"), ("cut2_scoring", "`cut2_scoring`"), ("trl", None),
                       ("cut1", "`cut1`, flat start"), ("cut1_ridge", "`cut1_ridge`")):
        curves = curves_of(row, 20)
        assert module.summary([statistics.mean(c) for c in curves]).replace("+-", "±") in docs
        assert module.summary([statistics.mean(c[-10:]) for c in curves]).replace("+-", "±") in docs
        assert label is None or f"| {label} | {against_trl(curves, trl)}" in docs, row
    for row, other, told in (("cut1_scoring", "trl", "p = 0.15"), ("cut2_scoring", "trl", "p = 0.95"),
                             ("cut1", "trl", "p = 1.00"), ("cut1_ridge", "trl", "p = 0.48"),
                             ("cut1", "cut1_scoring", "p = 0.16")):
        p = module.permutation_p(*([statistics.mean(c) for c in curves_of(r, 20)] for r in (row, other)))
        assert told in docs and round(p, 2) == float(told[4:]), (row, other, p)
    # the flat start confirmed on ten seeds it was not chosen on (20-29), and over all thirty
    for first, label in ((20, "seeds 20-29"), (0, "seeds 0-29")):
        ours, theirs = ([r["rewards"] for r in sorted(runs, key=lambda r: r["seed"])
                         if r["row"] == row and first <= r["seed"] < 30] for row in ("cut1", "trl"))
        assert len(ours) == len(theirs) == 30 - first
        means = [[statistics.mean(c) for c in cs] for cs in (ours, theirs)]
        lasts = [[statistics.mean(c[-10:]) for c in cs] for cs in (ours, theirs)]
        row = (f"| {label} | {module.summary(means[0])} | {module.summary(means[1])} | "
               f"p = {module.permutation_p(*means):.2f} | {module.summary(lasts[0])} | {module.summary(lasts[1])} |")
        assert row.replace("+-", "±") in docs, row
        assert f"| `cut1`, {label} | {against_trl(ours, theirs)}" in docs, label
    flat = [statistics.mean(c) for c in curves_of("cut1", 20)]
    assert f"{statistics.mean(flat):.3f} against {statistics.mean(statistics.mean(c) for c in trl):.3f}" in summaries
