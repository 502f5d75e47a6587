"""The side-by-side harness the throughput benchmarks share: the peer's data, TRL runs in its own venv, repeats that
alternate ours and TRL's (each in a fresh process, so drifting load hits both), and the ratio table."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

PEER = Path(__file__).resolve().parents[1].parent / "shared" / "peer-baseline" / "trl"


def peer_adamw(lr: float) -> dict:
    """The peer's optimizer, for our side: transformers' TrainingArguments defaults (AdamW, betas 0.9/0.999, eps
    1e-8) with weight decay 0 and a constant lr. Our stages default to betas 0.9/0.95, which learns more slowly over
    a benchmark's few steps (the speed is the same either way)."""
    return {"lr": lr, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8}


def repeats(text: str) -> int:
    """argparse type of `--repeats`: a whole number of at least 1 (the tables take medians over the repeats)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1 (the tables are medians over the repeats)")
    return value


def bench_root() -> Path:
    return Path(os.environ.get("TRL_BENCH_ROOT", "/tmp/trl-bench"))


def ensure_data(root: Path, python: str) -> Path:
    """The peer's byte-identical data, tokenizer and seed-0 initial policy under <root>/data (made once)."""
    data = root / "data"
    if not (data / "init_policy" / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        for f in ("make_data.py", "bench_trl.py"):
            if not (root / f).exists():
                (root / f).write_text((PEER / f).read_text())
        env = {**os.environ, "TRL_BENCH_ROOT": str(root)}
        subprocess.run([python, str(root / "make_data.py")], check=True, env=env, cwd=root)
        code = "import sys; sys.argv=['x']; import bench_trl as b; b.ensure_assets()"
        subprocess.run([python, "-c", code], check=True, env=env, cwd=root)
    return data


def run_trl(root: Path, task: str, repeat: int, keys: tuple[str, ...]) -> dict:
    env = {**os.environ, "TRL_BENCH_ROOT": str(root)}
    subprocess.run([str(root / "venv" / "bin" / "python"), str(root / "bench_trl.py"), "run", "--task", task,
                    "--repeat", str(repeat)], check=True, env=env, cwd=root, capture_output=True)
    rec = json.loads((root / "results" / f"{task}_r{repeat}.json").read_text())
    return {k: rec[k] for k in keys}


def side_by_side(script: str, task: str, keys: tuple[str, ...], repeats: int) -> tuple[list[dict], list[dict]]:
    """Run `script --ours-only` (prints one JSON line) and TRL's `task`, alternating, `repeats` times each."""
    root = bench_root()
    trl_python = root / "venv" / "bin" / "python"
    have_trl = trl_python.exists()
    ensure_data(root, str(trl_python) if have_trl else sys.executable)
    ours, theirs = [], []
    for r in range(repeats):
        out = subprocess.run([sys.executable, script, "--ours-only"], check=True, capture_output=True, text=True,
                             env={**os.environ, "TRL_BENCH_ROOT": str(root)})
        ours.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if have_trl:
            theirs.append(run_trl(root, task, r, keys))
    return ours, theirs


def print_table(title: str, rows: list[tuple[str, list[dict]]], columns: list[tuple[str, str, str]],
                ratio_key: str) -> None:
    """columns: (key, header, format); the ratio is against the last row's median of ratio_key."""
    med: Callable[[list[dict], str], float] = lambda rs, k: statistics.median(x[k] for x in rs)  # noqa: E731
    present = [(name, rs) for name, rs in rows if rs]
    base = med(present[-1][1], ratio_key) if len(present) > 1 else None
    print(title)
    print("| trainer | " + " | ".join(h for _, h, _ in columns) + " | ratio |")
    print("|---|" + "---|" * len(columns) + "---|")
    for name, rs in present:
        cells = " | ".join(format(med(rs, k), f) for k, _, f in columns)
        ratio = f"{med(rs, ratio_key) / base:.2f}x" if base else "n/a"
        print(f"| {name} | {cells} | {ratio} |")
    for name, rs in rows:
        print(f"per repeat, {name}:", [round(x[ratio_key], 1) for x in rs] if rs else "not run (no TRL venv)")


def step_timer(times: list[float], tokens: list[int]):
    """A Lightning callback recording the wall time between consecutive step ends (data loading included, as the
    peer's TrainerCallback measures) and the non-padding tokens of each batch."""
    import pytorch_lightning as pl

    class StepTimer(pl.Callback):
        def on_train_start(self, *args):
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, idx):
            now = time.perf_counter()
            times.append(now - self.t)
            tokens.append(int(batch["attention_mask"].sum()))
            self.t = now

    return StepTimer()


def quiet_trainer(steps: int, callbacks: list):
    """A bare Lightning Trainer for a timed run: no logger, checkpoints, progress bar or validation. It clips the
    gradient norm at 1.0, as our stages do by default and as the peer's trainers do (transformers' default
    max_grad_norm)."""
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      gradient_clip_val=1.0, callbacks=callbacks, inference_mode=False)


def bench_main(doc: str, script: str, run_ours: Callable[[Path], dict], task: str, title: str, names: tuple[str, str],
               columns: list[tuple[str, str, str]]) -> None:
    """The command line of a side-by-side benchmark: `--repeats N`, and `--ours-only` (internal: one run of ours,
    printed as JSON). The ratio column is the first column's median, ours over TRL's."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=repeats, default=3)
    ap.add_argument("--ours-only", action="store_true", help="internal: run our side once and print JSON")
    args = ap.parse_args()
    if args.ours_only:
        print(json.dumps(run_ours(bench_root() / "data")))
        return
    keys = tuple(k for k, _, _ in columns)
    ours, theirs = side_by_side(script, task, keys, args.repeats)
    print_table(f"{title}, median of {args.repeats}", [(names[0], ours), (names[1], theirs)], columns, keys[0])


def timed_fit(module, steps: int, warmup: int, per_step: int, unit: str, **fit_kwargs) -> dict:
    """Fit `module` for `steps` steps under a quiet Trainer, timing each step; the rates over the steps after
    `warmup` (see window_rates). fit_kwargs go to Trainer.fit (datamodule=..., or train_dataloaders=...)."""
    times: list[float] = []
    tokens: list[int] = []
    quiet_trainer(steps, [step_timer(times, tokens)]).fit(module, **fit_kwargs)
    return window_rates(times, tokens, per_step, unit, warmup)


def window_rates(times: list[float], tokens: list[int], per_step: int, unit: str, warmup: int) -> dict:
    """Throughput over the steps after `warmup` (the peer's window): `<unit>_per_s` and `tokens_per_s`."""
    wall = sum(times[warmup:])
    return {f"{unit}_per_s": per_step * len(times[warmup:]) / wall, "tokens_per_s": sum(tokens[warmup:]) / wall}
