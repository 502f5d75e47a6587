"""SFT throughput beside TRL's SFTTrainer on the exact workload of ../shared/peer-baseline/trl (task `sft`): GPT-2
4 layers x 128, vocab 4096, 2048 prompt/completion pairs, batch 16, completion-only loss, max length 128, constant
lr 5e-4, 100 steps, throughput over steps 11-100. Repeats alternate ours and TRL's, each in a fresh process.

    export TRL_BENCH_ROOT=/tmp/trl-bench          # holds venv/ with trl==1.16.0 and torch==2.13.0 (see its README)
    python benchmarks/sft_throughput.py --repeats 3

Without TRL_BENCH_ROOT/venv only our side runs (the data then comes from the peer's make_data.py run with our
Python; it needs only `tokenizers` and `transformers`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEER = Path(__file__).resolve().parents[1].parent / "shared" / "peer-baseline" / "trl"
STEPS, WARMUP, BATCH, LR, MAX_LEN = 100, 10, 16, 5e-4, 128


def ensure_data(root: Path, python: str) -> Path:
    data = root / "data"
    if not (data / "init_policy" / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        for f in ("make_data.py", "bench_trl.py"):
            if not (root / f).exists():
                (root / f).write_text((PEER / f).read_text())
        env = {**os.environ, "TRL_BENCH_ROOT": str(root)}
        subprocess.run([python, str(root / "make_data.py")], check=True, env=env, cwd=root)
        # the initial policy: seed-0 GPT-2 of the peer's config, saved once (bench_trl.ensure_assets does the same)
        code = ("import sys; sys.argv=['x']; import bench_trl as b; b.ensure_assets()")
        subprocess.run([python, "-c", code], check=True, env=env, cwd=root)
    return data


def run_ours(data: Path) -> dict:
    """Our SFT stage's training path (plain format: prompt + completion + EOS, loss on completion + EOS)."""
    import pytorch_lightning as pl
    import torch

    from framework.imitation import encode_demonstrations
    from framework.models import load_causal_lm
    from framework.stages.lm_module import CausalLMModule
    from framework.stages.sft import ImitationDataModule
    from framework.interfaces import ImitationContext
    from framework.tokenization import load_tokenizer
    from plugins.datasets.demonstrations import JsonlDemonstrations
    from plugins.imitation.bc import BehaviourCloning
    from plugins.losses.lm import LMCrossEntropy

    torch.manual_seed(0)
    tok = load_tokenizer(data / "tokenizer")
    model = load_causal_lm(str(data / "init_policy"))
    examples = encode_demonstrations(tok, JsonlDemonstrations(str(data / "sft.jsonl")).demonstrations(), "plain", MAX_LEN)
    ctx = ImitationContext(examples, [], None, model, tok, tok.eos_token_id, 0, None, 0)
    dm = ImitationDataModule(BehaviourCloning(), lambda: ctx, [], BATCH, STEPS, tok.pad_token_id, 0)
    times, tokens = [], []

    class Timer(pl.Callback):
        """Wall time between consecutive step ends (data loading included), as TRL's harness measures."""

        def on_train_start(self, *args):
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, idx):
            now = time.perf_counter()
            times.append(now - self.t)
            tokens.append(int(batch["attention_mask"].sum()))
            self.t = now

    module = CausalLMModule(model, LMCrossEntropy(), {"lr": LR, "weight_decay": 0.0}, {"warmup_steps": 0, "min_lr_ratio": 1.0})
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, max_epochs=1, limit_train_batches=STEPS,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[Timer()], inference_mode=False)
    trainer.fit(module, datamodule=dm)
    window = slice(WARMUP, STEPS)
    wall = sum(times[window])
    return {"sequences_per_s": BATCH * len(times[window]) / wall, "tokens_per_s": sum(tokens[window]) / wall}


def run_trl(root: Path, repeat: int) -> dict:
    env = {**os.environ, "TRL_BENCH_ROOT": str(root)}
    subprocess.run([str(root / "venv" / "bin" / "python"), str(root / "bench_trl.py"), "run", "--task", "sft",
                    "--repeat", str(repeat)], check=True, env=env, cwd=root, capture_output=True)
    rec = json.loads((root / "results" / f"sft_r{repeat}.json").read_text())
    return {"sequences_per_s": rec["sequences_per_s"], "tokens_per_s": rec["tokens_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ours-only", action="store_true", help="internal: run our side once and print JSON")
    args = ap.parse_args()
    root = Path(os.environ.get("TRL_BENCH_ROOT", "/tmp/trl-bench"))
    if args.ours_only:
        print(json.dumps(run_ours(root / "data")))
        return
    trl_python = root / "venv" / "bin" / "python"
    have_trl = trl_python.exists()
    ensure_data(root, str(trl_python) if have_trl else sys.executable)
    ours, theirs = [], []
    for r in range(args.repeats):  # alternate, each in a fresh process, so drifting load hits both
        out = subprocess.run([sys.executable, __file__, "--ours-only"], check=True, capture_output=True, text=True,
                             env={**os.environ, "TRL_BENCH_ROOT": str(root)})
        ours.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if have_trl:
            theirs.append(run_trl(root, r))
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    print(f"SFT, batch {BATCH}, {STEPS} steps (window {WARMUP + 1}-{STEPS}), median of {args.repeats}")
    print(f"| {'trainer':<22} | {'seq/s':>7} | {'tokens/s':>9} | {'ratio':>6} |")
    print(f"|{'-' * 24}|{'-' * 9}|{'-' * 11}|{'-' * 8}|")
    base = med(theirs, "sequences_per_s") if theirs else None
    rows = [("rlhf-lab sft (bc)", ours)] + ([("TRL 1.16 SFTTrainer", theirs)] if theirs else [])
    for name, rs in rows:
        ratio = f"{med(rs, 'sequences_per_s') / base:.2f}x" if base else "n/a"
        print(f"| {name:<22} | {med(rs, 'sequences_per_s'):>7.1f} | {med(rs, 'tokens_per_s'):>9.0f} | {ratio:>6} |")
    print("per repeat, ours:", [round(x["sequences_per_s"], 1) for x in ours],
          "TRL:", [round(x["sequences_per_s"], 1) for x in theirs] if theirs else "not run (no TRL venv)")


if __name__ == "__main__":
    main()
