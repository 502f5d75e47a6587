"""DPO throughput beside TRL's DPOTrainer on the exact workload of ../shared/peer-baseline/trl (task `dpo`): the peer's
seed-0 initial policy (GPT-2 4 layers x 128, vocab 4096, 1.33 M params) and its frozen copy as the reference, 2048
preference pairs, batch 16 pairs, max length 128, beta 0.1, constant lr 1e-4, 100 steps, throughput over steps
11-100. Repeats alternate ours and TRL's, each in a fresh process. Ours is the offline path of `stage=rl algo=dpo`:
chosen and rejected of a batch in one policy forward and one reference forward (as DPOTrainer does).

    export TRL_BENCH_ROOT=/tmp/trl-bench          # holds venv/ with trl==1.16.0 and torch==2.13.0 (see its README)
    python benchmarks/dpo_throughput.py --repeats 3
"""

from __future__ import annotations

import copy
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import bench_main, peer_adamw, timed_fit  # noqa: E402

STEPS, WARMUP, BATCH, LR, MAX_LEN = 100, 10, 16, 1e-4, 128


def run_ours(data: Path) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from framework.data import ListDataset
    from framework.models import disable_dropout, load_causal_lm
    from framework.stages.preference import PreferenceModule, collate_pairs, encode_pairs
    from framework.tokenization import load_tokenizer
    from plugins.algorithms.dpo import DPO
    from plugins.datasets.comparisons import JsonlComparisons

    torch.manual_seed(0)
    tok = load_tokenizer(data / "tokenizer")
    policy = load_causal_lm(str(data / "init_policy"))
    disable_dropout(policy)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    pairs = encode_pairs(tok, list(JsonlComparisons(str(data / "pref.jsonl")).comparisons()), "plain", MAX_LEN)
    loader = DataLoader(ListDataset(pairs), batch_size=BATCH, shuffle=True, drop_last=True,
                        collate_fn=partial(collate_pairs, pad_id=tok.pad_token_id))
    module = PreferenceModule(policy, reference, DPO(beta=0.1), peer_adamw(LR),
                              {"warmup_steps": 0, "min_lr_ratio": 1.0})
    return timed_fit(module, STEPS, WARMUP, BATCH, "pairs", train_dataloaders=loader)


if __name__ == "__main__":
    bench_main(__doc__, __file__, run_ours, "dpo", f"DPO, batch {BATCH} pairs, {STEPS} steps (window {WARMUP + 1}-{STEPS})",
               ("rlhf-lab rl (dpo)", "TRL 1.16 DPOTrainer"), [("pairs_per_s", "pairs/s", ".1f"), ("tokens_per_s", "tokens/s", ".0f")])
