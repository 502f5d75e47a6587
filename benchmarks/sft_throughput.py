"""SFT throughput beside TRL's SFTTrainer on the exact workload of ../shared/peer-baseline/trl (task `sft`): GPT-2
4 layers x 128, vocab 4096, 2048 prompt/completion pairs, batch 16, completion-only loss, max length 128, constant
lr 5e-4, 100 steps, throughput over steps 11-100. Repeats alternate ours and TRL's, each in a fresh process.

    export TRL_BENCH_ROOT=/tmp/trl-bench          # holds venv/ with trl==1.16.0 and torch==2.13.0 (see its README)
    python benchmarks/sft_throughput.py --repeats 3

Without TRL_BENCH_ROOT/venv only our side runs (the data then comes from the peer's make_data.py run with our
Python; it needs only `tokenizers` and `transformers`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import bench_main, peer_adamw, timed_fit  # noqa: E402

STEPS, WARMUP, BATCH, LR, MAX_LEN = 100, 10, 16, 5e-4, 128


def run_ours(data: Path) -> dict:
    """Our SFT stage's training path (plain format: prompt + completion + EOS, loss on completion + EOS)."""
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
    module = CausalLMModule(model, LMCrossEntropy(), peer_adamw(LR), {"warmup_steps": 0, "min_lr_ratio": 1.0})
    return timed_fit(module, STEPS, WARMUP, BATCH, "sequences", datamodule=dm)


if __name__ == "__main__":
    bench_main(__doc__, __file__, run_ours, "sft", f"SFT, batch {BATCH}, {STEPS} steps (window {WARMUP + 1}-{STEPS})",
               ("rlhf-lab sft (bc)", "TRL 1.16 SFTTrainer"), [("sequences_per_s", "seq/s", ".1f"), ("tokens_per_s", "tokens/s", ".0f")])
