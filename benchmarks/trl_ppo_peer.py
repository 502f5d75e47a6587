"""TRL's PPO on the peer workload, for benchmarks/rl_throughput.py --algo ppo. Runs in a venv with trl==1.12.0 (the
last release with `trl.experimental.ppo`) and torch==2.13.0, never in the project's environment:

    $TRL_BENCH_ROOT/venv112/bin/python benchmarks/trl_ppo_peer.py --repeat 0 [--reward a]   # prints one JSON line

Workload (the same as ours): the peer's seed-0 initial policy (1.33 M params) and its frozen copy as reference;
the reward model trained by the peer's `rm` task (`$TRL_BENCH_ROOT/out/rm_model`, a GPT2ForSequenceClassification),
which also initialises the value model; per step 16 prompts x 1 sample x up to 32 new tokens at temperature 1;
4 PPO epochs x 4 minibatches, KL coefficient 0.05 (k1; `--kl`), constant lr 5e-4, 60 steps (`--steps`),
throughput over steps 6 to the end.

`--reward a` scores the responses with the peer's GRPO reward instead (the fraction of non-space completion
characters that are "a", on the decoded response as TRL's GRPOTrainer decodes it): that reward model scores nearly
every sample of a random policy alike, so its curve compares nothing, while this one moves. TRL 1.12's PPOTrainer
takes only a model as its reward, so the harness replaces the trainer's `get_reward` for the reward call (the value
model's calls are untouched, and the value model still starts from the reward model). `--prompts` sets the prompts
per step (split into 4 minibatches), `--bf16` turns on TrainingArguments' bf16.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import time

STEPS, WARMUP, PROMPTS, NEW, LR = 60, 5, 16, 32, 5e-4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=0)
    ap.add_argument("--reward", choices=("rm", "a"), default="rm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--kl", type=float, default=0.05, help="the KL coefficient")
    ap.add_argument("--prompts", type=int, default=PROMPTS, help="prompts per step (one sample each)")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (TrainingArguments' bf16)")
    args = ap.parse_args()
    if args.steps <= WARMUP:
        ap.error(f"--steps {args.steps}: more than the {WARMUP} warm-up steps, or nothing is timed")
    if args.prompts < 4 or args.prompts % 4:
        ap.error(f"--prompts {args.prompts}: a positive multiple of 4 (a step is split into 4 minibatches)")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    ppo_trainer = importlib.import_module("trl.experimental.ppo.ppo_trainer")
    from rl_throughput import fraction_of_a  # the same scoring as our side (benchmarks/ is this script's sys.path[0])

    root = os.environ.get("TRL_BENCH_ROOT", "/tmp/trl-bench")
    data, rm_dir = f"{root}/data", f"{root}/out/rm_model"
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(f"{data}/tokenizer", padding_side="left")
    prompts = [json.loads(line)["prompt"] for line in open(f"{data}/rl_prompts.jsonl")]
    ds = Dataset.from_list([{"input_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in prompts])
    policy = AutoModelForCausalLM.from_pretrained(f"{data}/init_policy")
    ref = AutoModelForCausalLM.from_pretrained(f"{data}/init_policy")
    reward = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    value = AutoModelForSequenceClassification.from_pretrained(rm_dir)
    if args.reward == "a":
        original = ppo_trainer.get_reward

        def get_reward(model, query_responses, pad_token_id, context_length):
            if model is not reward:
                return original(model, query_responses, pad_token_id, context_length)
            texts = tok.batch_decode(query_responses[:, context_length:], skip_special_tokens=True)
            fractions = fraction_of_a([t.strip() for t in texts])  # stripped, as our side decodes a completion
            return None, torch.tensor(fractions, dtype=torch.float32, device=query_responses.device), None

        ppo_trainer.get_reward = get_reward
    cfg = PPOConfig(
        output_dir=f"{root}/out/ppo_r{args.repeat}", per_device_train_batch_size=args.prompts, num_mini_batches=4,
        gradient_accumulation_steps=1, num_ppo_epochs=4, total_episodes=args.prompts * args.steps, response_length=NEW,
        temperature=1.0, kl_coef=args.kl, kl_estimator="k1", learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, seed=args.seed, use_cpu=True, bf16=args.bf16, fp16=False, report_to="none",
        logging_steps=1, save_strategy="no", eval_strategy="no", num_sample_generations=0, disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, local_rollout_forward_batch_size=args.prompts,
        stop_token="eos", missing_eos_penalty=None, gradient_checkpointing=False,
    )
    # TRL 1.12: a rollout is per_device_train_batch_size x gradient_accumulation_steps prompts (--prompts, 16),
    # split into num_mini_batches minibatches (4 of 4); one on_step_end per rollout
    times, scores = [], []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

        def on_log(self, a, state, control, logs=None, **k):
            if logs and "objective/scores" in logs:
                scores.append(float(logs["objective/scores"]))

    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=ds, value_model=value, callbacks=[Timer()])
    trainer.train()
    wall = sum(times[WARMUP:])
    print(json.dumps({"episodes_per_s": args.prompts * len(times[WARMUP:]) / wall, "steps": len(times),
                      "reward_first10": statistics.mean(scores[:10]) if scores else float("nan"),
                      "reward_last10": statistics.mean(scores[-10:]) if scores else float("nan"),
                      "rewards": scores}))


if __name__ == "__main__":
    main()
