"""PPO's reward curve beside TRL 1.12's PPOTrainer over many seeds: the "equal or better reward curve over the same
steps" half of the RL speed goal, which three seeds (`rl_throughput.py --seeds`) cannot settle.

The workload is `rl_throughput.py --algo ppo --ppo-reward a`'s (the peer's 1.33 M-param policy, 16 prompts x 1 sample
x up to 32 new tokens a step, 4 epochs x 4 minibatches, constant lr 5e-4, the fraction of "a" as the reward, TRL's
value model from the peer's reward model), at KL coefficient 0 by default (`--kl`; at 0.05 neither side's reward
moves in 150 steps). Rows:

- `shared`: ours with the `rl` stage's defaults (a value head on the policy's trunk, log-probs in a fresh forward);
- `branch1`, `branch2`: ours with the value head on a branch of copies of the policy's top 1 or 2 layers
  (`algo.value_layers=1` or `2`, trlX's `num_value_layers_unfrozen`), otherwise as `shared`;
- `separate`: ours with TRL's arithmetic (a value model of its own from the reward model, log-probs from sampling);
- `cut1`, `cut2`: ours as `separate`, with the critic cut to the reward model's bottom 1 or 2 layers
  (`algo.critic_layers=1` or `2`: the value layer starts flat at the whole critic's mean value; until 2026-12-01 it
  was the reward model's scoring layer, and docs/data keeps those runs as `cut1_scoring`, `cut2_scoring`);
- `trl`: TRL 1.12's PPOTrainer (`trl_ppo_peer.py` in `$TRL_BENCH_ROOT/venv112`).

Each run is one process with one thread, `--jobs` of them at a time (so the speeds printed by rl_throughput.py are
not measured here: only the rewards, which do not depend on timing). Every finished run is appended to `--out` as
a JSON line, and runs already there are not repeated, so a sweep can be stopped and continued (a line that does not
parse, say from a killed run, is skipped with a warning). Prints, per row, the mean reward over the whole run (the
area under the curve) and over its last 10 steps as mean +- standard error, the latter also by seed; the mean
reward in five windows of the run, and each row's difference from TRL's in each window with its p-value; and
every pair of rows: the difference of the means with a two-sided permutation p-value (not corrected for the number
of comparisons). When `--out` already holds every run asked for, nothing runs
and nothing of the peer's is needed: the command prints the figures from the file.

    export TRL_BENCH_ROOT=/tmp/trl-bench
    python benchmarks/ppo_reward_curves.py --seeds 10 --steps 150
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import bench_root, ensure_data  # noqa: E402
from rl_throughput import ensure_reward_model  # noqa: E402

HERE = Path(__file__).resolve().parent
ROWS = ("shared", "branch1", "branch2", "separate", "cut1", "cut2", "trl")


def command(row: str, seed: int, steps: int, kl: float, root: Path) -> list[str]:
    common = ["--steps", str(steps), "--seed", str(seed)]
    if row == "trl":
        return [str(root / "venv112" / "bin" / "python"), str(HERE / "trl_ppo_peer.py"), "--reward", "a",
                "--kl", str(kl), "--repeat", str(seed), *common]
    extra = []
    if row == "shared" or row.startswith("branch"):  # branchN: the value head on a branch of the top N layers
        layers = row[len("branch"):] if row.startswith("branch") else "0"
        extra = ["--fresh-logprobs", "--critic", "shared", "--value-layers", layers]
    elif row.startswith("cut"):  # cutN: the separate critic cut to the reward model's bottom N layers
        extra = ["--critic-layers", row[len("cut"):]]
    return [sys.executable, str(HERE / "rl_throughput.py"), "--ours-only", "--algo", "ppo", "--ppo-reward", "a",
            "--ppo-kl", str(kl), *extra, *common]


def run(row: str, seed: int, steps: int, kl: float, root: Path) -> dict:
    env = {**os.environ, "TRL_BENCH_ROOT": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(command(row, seed, steps, kl, root), capture_output=True, text=True, env=env,
                         cwd=root if row == "trl" else None)
    if out.returncode:
        raise SystemExit(f"{row} seed {seed} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if len(result["rewards"]) != steps:
        raise SystemExit(f"{row} seed {seed}: {len(result['rewards'])} rewards for {steps} steps")
    return {"row": row, "seed": seed, "steps": steps, "kl": kl, "rewards": result["rewards"]}


def permutation_p(a: list[float], b: list[float], draws: int = 20000) -> float:
    """Two-sided p-value of the difference of means under random relabelling (fixed seed: the same data, the same p)."""
    observed, pooled, rng, hits = abs(statistics.mean(a) - statistics.mean(b)), a + b, random.Random(0), 0
    for _ in range(draws):
        rng.shuffle(pooled)
        hits += abs(statistics.mean(pooled[:len(a)]) - statistics.mean(pooled[len(a):])) >= observed - 1e-12
    return (hits + 1) / (draws + 1)


def p_text(p: float) -> str:
    """A p-value to three places; below 0.001 as "< 0.001" (20000 draws cannot resolve less)."""
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def summary(values: list[float]) -> str:
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} +- {se:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 on every row")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--kl", type=float, default=0.0, help="the KL coefficient on every row")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                    help="shared: ours, the rl stage's defaults; branch1, branch2: ours, algo.value_layers=1 or 2; "
                         "separate: ours, TRL's arithmetic; cut1, cut2: ours as separate, algo.critic_layers=1 or 2; "
                         "trl: TRL 1.12")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time, one thread each")
    ap.add_argument("--out", type=Path, default=Path("ppo_reward_curves.jsonl"),
                    help="JSON lines, one per finished run; runs already there are kept and not repeated")
    args = ap.parse_args()
    if args.steps < 20 or args.seeds < 2 or args.jobs < 1:
        ap.error("--steps >= 20 (as rl_throughput.py), --seeds >= 2 (the summary takes a spread) and --jobs >= 1")
    args.rows = list(dict.fromkeys(args.rows))
    done = read_runs(args.out, args.steps, args.kl)
    todo = [(row, s) for s in range(args.seeds) for row in args.rows if (row, s) not in done]
    print(f"{len(done)} runs read from {args.out}, {len(todo)} to run, {args.jobs} at a time", flush=True)
    if todo:
        root = prepared_root(ap, args.rows)
        lock = threading.Lock()

        def one(job):
            result = run(*job, args.steps, args.kl, root)
            with lock, args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"done: {job[0]} seed {job[1]}: last 10 steps {statistics.mean(result['rewards'][-10:]):.3f}",
                  flush=True)
            return result

        with ThreadPoolExecutor(args.jobs) as pool:
            for r in pool.map(one, todo):
                done[r["row"], r["seed"]] = r
    report({row: [done[row, s]["rewards"] for s in range(args.seeds)] for row in args.rows}, args.steps, args.kl)


def read_runs(out: Path, steps: int, kl: float) -> dict:
    """The finished runs in `out` with these steps and KL coefficient, by (row, seed); a line that does not parse
    (a killed run's) is skipped with a warning."""
    done = {}
    if out.exists():
        for number, line in enumerate(out.read_text().splitlines(), 1):
            try:
                r = json.loads(line)
                key, same = (r["row"], r["seed"]), r["steps"] == steps and r["kl"] == kl
            except (ValueError, KeyError, TypeError):
                print(f"warning: {out}:{number} is not a finished run (skipped, run again)", file=sys.stderr)
                continue
            if same:
                done[key] = r
    return done


def prepared_root(ap: argparse.ArgumentParser, rows: list[str]) -> Path:
    """The peer's folder with what the rows need (its data; the reward model for trl, separate, cut1 and cut2), made
    once."""
    root = bench_root()
    trl_python = root / "venv" / "bin" / "python"
    if "trl" in rows and not (root / "venv112" / "bin" / "python").exists():
        ap.error(f"{root / 'venv112'} is missing: TRL 1.12's row runs there (see trl_ppo_peer.py); or run only our "
                 "rows, --rows shared separate")
    needs_rm = {"trl", "separate", "cut1", "cut2"} & set(rows)
    if needs_rm and not (root / "out" / "rm_model" / "config.json").exists() \
            and not trl_python.exists():
        ap.error(f"no reward model at {root / 'out' / 'rm_model'} (the value model's start in the rows trl, separate, "
                 f"cut1 and cut2) and no {root / 'venv'} (TRL 1.16, ../shared/peer-baseline/trl/README.md) to train it "
                 "with the peer's rm task; or run --rows shared branch1")
    ensure_data(root, str(trl_python) if trl_python.exists() else sys.executable)
    if needs_rm:  # their value model starts from it
        ensure_reward_model(root, trl_python)
    return root


def windows(steps: int) -> list[range]:
    """Five equal windows of the run's steps (the last takes the remainder)."""
    width = steps // 5
    return [range(i * width, steps if i == 4 else (i + 1) * width) for i in range(5)]


def report(by_row: dict[str, list[list[float]]], steps: int, kl: float) -> None:
    seeds = len(next(iter(by_row.values())))
    print(f"\nPPO, fraction of 'a', KL {kl}, {steps} steps, seeds 0-{seeds - 1}")
    print("| row | mean over all steps | mean over the last 10 | last 10 by seed |")
    print("|---|---|---|---|")
    area = {row: [statistics.mean(c) for c in curves] for row, curves in by_row.items()}
    last = {row: [statistics.mean(c[-10:]) for c in curves] for row, curves in by_row.items()}
    for row in by_row:
        print(f"| {row} | {summary(area[row])} | {summary(last[row])} | {', '.join(f'{x:.3f}' for x in last[row])} |")
    spans = windows(steps)
    print("\nmean reward by window, over the seeds")
    print("| row | " + " | ".join(f"steps {w.start + 1}-{w.stop}" for w in spans) + " |")
    print("|---|" + "---|" * len(spans))
    for row, curves in by_row.items():
        cells = (statistics.mean(statistics.mean(c[w.start:w.stop]) for c in curves) for w in spans)
        print(f"| {row} | " + " | ".join(f"{x:.3f}" for x in cells) + " |")
    if "trl" in by_row:
        print("\nby window, each row minus TRL's, with its permutation p-value")
        print("| row | " + " | ".join(f"steps {w.start + 1}-{w.stop}" for w in spans) + " |")
        print("|---|" + "---|" * len(spans))
        for row, curves in by_row.items():
            if row != "trl":
                cells = []
                for w in spans:
                    ours, theirs = ([statistics.mean(c[w.start:w.stop]) for c in by_row[r]] for r in (row, "trl"))
                    cells.append(f"{statistics.mean(ours) - statistics.mean(theirs):+.3f} (p {p_text(permutation_p(ours, theirs))})")
                print(f"| {row} | " + " | ".join(cells) + " |")
    print("\ndifferences of the means, two-sided permutation p-values (not corrected for the number of comparisons)")
    rows = list(by_row)
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            print(f"{a} - {b}: all steps {statistics.mean(area[a]) - statistics.mean(area[b]):+.3f} "
                  f"(p {p_text(permutation_p(area[a], area[b]))}), last 10 "
                  f"{statistics.mean(last[a]) - statistics.mean(last[b]):+.3f} "
                  f"(p {p_text(permutation_p(last[a], last[b]))})")


if __name__ == "__main__":
    main()
