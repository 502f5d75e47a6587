"""Where one PPO update of the `--algo ppo` workload of benchmarks/rl_throughput.py spends its time, against the
floor of its matrix products on this machine: how much faster the update could get without lower precision.

One update = the stage's own forward of policy and separate critic (`PolicyWithValue`, LM head only over the 32
response positions), log-probs, a PPO-shaped loss, backward, fused AdamW; a minibatch of 4 of the peer's prompts,
left-padded, with 32 response tokens (as in a rollout). It prints:
- the update's time (median of `--repeats` blocks of 50 updates);
- the matrix products' share of it (torch.profiler: aten::mm, addmm, bmm, their FLOPs), and the time those FLOPs
  take at the rate an sgemm of the update's own shapes reaches here, measured in the same process;
- the bound on running policy and critic trunks as one computation: the two trunks' forward and backward at
  batch 4 beside one trunk at batch 8 (the same FLOPs, half the operator calls), timed in alternating blocks.

    TRL_BENCH_ROOT=/tmp/trl-bench python benchmarks/ppo_update_floor.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import bench_root, repeats  # noqa: E402

PROMPTS, NEW = 4, 32


def interleaved(fns, n: int, repeats: int) -> list[float]:
    """`timed` of several functions, their blocks taken in turn: the median ms per call of each."""
    for fn in fns:
        for _ in range(max(3, n // 5)):
            fn()
    blocks: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, blocks):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - start) / n * 1e3)
    return [statistics.median(b) for b in blocks]


def timed(fn, n: int, repeats: int) -> float:
    """Median ms per call over `repeats` blocks of `n` calls, after a warm-up block."""
    return interleaved([fn], n, repeats)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=repeats, default=5)
    args = ap.parse_args()
    root = bench_root()
    data, rm_dir = root / "data", root / "out" / "rm_model"
    if not (rm_dir / "config.json").exists():
        sys.exit(f"no reward model at {rm_dir}: run `python benchmarks/rl_throughput.py --algo ppo` once first "
                 "(it makes the peer's data and trains it), or set TRL_BENCH_ROOT to where it was made")
    import torch
    from torch.profiler import ProfilerActivity, profile

    from framework.models import disable_dropout, load_causal_lm
    from framework.reward import critic_from_reward_model
    from framework.rl import token_logprobs
    from framework.stages.rl import PolicyWithValue, positions
    from framework.tokenization import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(data / "tokenizer")
    lm = load_causal_lm(str(data / "init_policy"))
    critic = critic_from_reward_model(str(rm_dir))[:2]
    for model in (lm, critic[0]):
        disable_dropout(model)
    policy = PolicyWithValue(lm, True, critic)
    opt = torch.optim.AdamW(policy.parameters(), lr=5e-4, betas=(0.9, 0.999), weight_decay=0.0, fused=True)

    lines = (data / "rl_prompts.jsonl").read_text().splitlines()[:PROMPTS]
    encoded = [tok(json.loads(line)["prompt"])["input_ids"] for line in lines]
    width = max(map(len, encoded))
    query = torch.full((PROMPTS, width), tok.pad_token_id)
    query_mask = torch.zeros(PROMPTS, width, dtype=torch.long)
    for i, ids in enumerate(encoded):
        query[i, width - len(ids):], query_mask[i, width - len(ids):] = torch.tensor(ids), 1
    response = torch.randint(0, len(tok), (PROMPTS, NEW))
    ids = torch.cat([query, response], 1)
    mask = torch.cat([query_mask, torch.ones_like(response)], 1)
    old = torch.randn(PROMPTS, NEW) - 8.0
    advantages, returns = torch.randn(PROMPTS, NEW), torch.randn(PROMPTS, NEW)

    def update():
        logits, values = policy(ids, mask, NEW)
        ratio = (token_logprobs(logits, response) - old).exp()
        loss = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages).mean()
        loss = loss + 0.5 * (values - returns).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    update_ms = timed(update, 50, args.repeats)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        for _ in range(20):
            update()
    gemm = [e for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    gemm_ms = sum(e.self_cpu_time_total for e in gemm) / 1e3 / 20
    gemm_flops = sum(e.flops for e in gemm) / 20
    rows = ids.numel()  # the sgemm rate of the update's own shape (tokens x hidden x 3 hidden), in this process
    hidden = int(lm.config.hidden_size)
    a, b = torch.randn(rows, hidden), torch.randn(hidden, 3 * hidden)
    sgemm_ms = timed(lambda: a @ b, 200, args.repeats)
    rate = 2 * rows * hidden * 3 * hidden / (sgemm_ms / 1e3)
    floor_ms = gemm_flops / rate * 1e3

    def trunk_step(model, times: int):
        """Forward and backward of a trunk over the minibatch repeated `times` times."""
        tids, tmask = ids.repeat(times, 1), mask.repeat(times, 1)
        return lambda: model(input_ids=tids, attention_mask=tmask, position_ids=positions(tmask),
                             use_cache=False).last_hidden_state.sum().backward()

    # the three in turn, block by block, so that drift in the machine's speed hits them alike
    policy_ms, critic_ms, double_ms = interleaved([trunk_step(lm.transformer, 1), trunk_step(critic[0], 1),
                                                   trunk_step(lm.transformer, 2)], 30, 3 * args.repeats)
    pair_ms = policy_ms + critic_ms
    print(f"one PPO update, policy + separate critic, minibatch {PROMPTS} x {ids.size(1)} tokens, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}:")
    print(f"  update                                  {update_ms:7.2f} ms")
    print(f"  matrix products (profiled)              {gemm_ms:7.2f} ms  {gemm_ms / update_ms:.0%} of the update, "
          f"{gemm_flops / 1e9:.2f} GFLOP")
    print(f"  the same FLOPs at this machine's sgemm  {floor_ms:7.2f} ms  ({rate / 1e9:.0f} GFLOP/s at "
          f"{rows}x{hidden}x{3 * hidden}); products run at {floor_ms / gemm_ms:.0%} of it")
    print(f"  everything else                         {update_ms - gemm_ms:7.2f} ms")
    print(f"  policy trunk + critic trunk, fwd+bwd    {pair_ms:7.2f} ms  (batch {PROMPTS} each)")
    print(f"  one trunk at batch {2 * PROMPTS}, fwd+bwd            {double_ms:7.2f} ms  "
          f"bound on fusing the two: {pair_ms - double_ms:.2f} ms an update ({(pair_ms - double_ms) / update_ms:.0%})")


if __name__ == "__main__":
    main()
