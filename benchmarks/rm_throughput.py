"""Reward-model throughput beside TRL's RewardTrainer on the exact workload of ../shared/peer-baseline/trl (task
`rm`): GPT-2 4 layers x 128, vocab 4096, 1.33 M params, 2048 preference pairs, batch 16 pairs, max length 128,
constant lr 5e-4, 100 steps, throughput over steps 11-100. Repeats alternate ours and TRL's, each in a fresh
process. Ours is the reward_model stage's training path: trunk of the peer's initial policy + the last-token head,
Bradley-Terry loss, chosen and rejected of a batch in one forward (as RewardTrainer does).

    export TRL_BENCH_ROOT=/tmp/trl-bench          # holds venv/ with trl==1.16.0 and torch==2.13.0 (see its README)
    python benchmarks/rm_throughput.py --repeats 3
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import bench_main, peer_adamw, timed_fit  # noqa: E402

STEPS, WARMUP, BATCH, LR, MAX_LEN = 100, 10, 16, 5e-4, 128


def run_ours(data: Path) -> dict:
    import torch

    from framework.models import load_causal_lm
    from framework.reward import RewardModel
    from framework.stages.reward import ComparisonDataModule, RewardModule, encode_rankings
    from framework.tokenization import load_tokenizer
    from plugins.datasets.comparisons import JsonlComparisons
    from plugins.losses.preference import BradleyTerry
    from plugins.reward_heads.heads import LastToken

    torch.manual_seed(0)
    tok = load_tokenizer(data / "tokenizer")
    rm = RewardModel.from_causal_lm(load_causal_lm(str(data / "init_policy")), LastToken())
    groups = encode_rankings(tok, list(JsonlComparisons(str(data / "pref.jsonl")).comparisons()), "plain", MAX_LEN)
    dm = ComparisonDataModule(groups, [], BATCH, tok.pad_token_id)
    module = RewardModule(rm, BradleyTerry(), peer_adamw(LR), {"warmup_steps": 0, "min_lr_ratio": 1.0})
    return timed_fit(module, STEPS, WARMUP, BATCH, "pairs", datamodule=dm)


if __name__ == "__main__":
    bench_main(__doc__, __file__, run_ours, "rm", f"Reward model, batch {BATCH} pairs, {STEPS} steps (window {WARMUP + 1}-{STEPS})",
               ("rlhf-lab reward_model", "TRL 1.16 RewardTrainer"), [("pairs_per_s", "pairs/s", ".1f"), ("tokens_per_s", "tokens/s", ".0f")])
