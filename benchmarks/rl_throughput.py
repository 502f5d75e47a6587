"""RL throughput beside TRL on the exact workloads of ../shared/peer-baseline/trl (tasks `grpo` and `rloo`): GPT-2
4 layers x 128, vocab 4096, 1.33 M params (the peer's seed-0 initial policy); per step 16 prompts x 4 generations x
exactly 32 new tokens (stop tokens suppressed until 32), full-distribution sampling at temperature 1; reward = the
fraction of non-space completion characters that are "a"; constant lr 5e-4, AdamW with the peer's betas 0.9/0.999;
60 steps, throughput over steps 6-60.
TRL's settings are the peer's (GRPO: beta 0, one update per generation; RLOO: beta 0.05); ours use the same values
(GRPO: kl.coef 0, so no reference forward; RLOO: KL coefficient 0.05 in the reward). Prints completions/s, the share
of time spent generating, and the reward over the first and last 10 steps (the learning curve must not be worse).

`--algo dpo` runs benchmarks/dpo_throughput.py (DPO is offline: its own workload, the peer's `dpo` task).

`--algo ppo` runs PPO beside TRL 1.12's `trl.experimental.ppo.PPOTrainer` (TRL 1.16 has no PPO; benchmarks/
trl_ppo_peer.py, in `$TRL_BENCH_ROOT/venv112`): 16 prompts x 1 sample x up to 32 new tokens per step, reward and
value model both from the reward model of the peer's `rm` task (ours: `algo.critic=separate`), 4 epochs x 4
minibatches, KL coefficient 0.05 (`--ppo-kl`), constant lr 5e-4, 60 steps (`--steps`). Like TRL's PPOTrainer, our
side takes the behaviour log-probs from the sampling pass (`stage.logprobs_from_sampling=true`); a second row of ours
recomputes them in a fresh forward (our default), in the same sitting. That reward model scores almost every sample of the random initial policy alike,
so its reward columns compare nothing; `--ppo-reward a` scores both sides with the GRPO workload's reward (the
fraction of "a") instead, whose curve moves (the value model still starts from the reward model). `--ppo-prompts 64`
runs 64 prompts a step on both sides (the GRPO and RLOO workloads' 64 completions a step; minibatches of 16), and
`--bf16` bf16 mixed precision on both sides. `--ppo-shared-critic` adds a third row of ours: the `rl` stage's default
critic, a value head on the policy's trunk (`algo.critic=shared`, with a fresh forward), which TRL's PPOTrainer does
not offer; it does less arithmetic than TRL's separate value model, so it is a different algorithm setting, shown
for its speed and its reward curve (use it with `--ppo-reward a`). `--ppo-value-layers N` adds a row with the value
head on a branch of copies of the policy's top N layers (`algo.value_layers=N`, trlX's `num_value_layers_unfrozen`).
`--ppo-critic-layers K` cuts the separate critic of our two PPO rows to the reward model's bottom K layers
(`algo.critic_layers=K`; TRL's side keeps its whole value model).

    export TRL_BENCH_ROOT=/tmp/trl-bench
    python benchmarks/rl_throughput.py --algo grpo --repeats 3
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import bench_root, ensure_data, peer_adamw, print_table, repeats, run_trl  # noqa: E402

STEPS, WARMUP, PROMPTS, GENERATIONS, NEW, LR = 60, 5, 16, 4, 32, 5e-4
PEER_ADAMW = peer_adamw(LR)
KEYS = ("episodes_per_s", "gen_share", "reward_first10", "reward_last10")


def fraction_of_a(completions) -> list[float]:
    out = []
    for c in completions:
        s = c.replace(" ", "")
        out.append(s.count("a") / len(s) if s else 0.0)
    return out


def run_ours(data: Path, algo: str, seed: int = 0, fresh_logprobs: bool = False, ppo_reward: str = "rm",
             steps: int = STEPS, ppo_kl: float = 0.05, ppo_prompts: int = PROMPTS, precision: str = "32-true",
             ppo_critic: str = "separate", value_layers: int = 0, critic_layers: int | None = None) -> dict:
    import copy

    import pytorch_lightning as pl
    import torch
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from framework.imitation import PromptEncoder
    from framework.interfaces import RewardFunction
    from framework.models import context_length, disable_dropout, load_causal_lm
    from framework.records import Prompt
    from framework.rollout import SamplingSettings
    from framework.stages.rl import PolicyWithValue, PromptCursor, RLModule, RLStage
    from framework.tokenization import load_tokenizer
    from plugins.algorithms.group import GRPO, RLOO
    from plugins.algorithms.ppo import PPO
    from plugins.rewards.learned import LearnedReward

    class FractionOfA(RewardFunction):
        def score(self, prompts, completions):
            return fraction_of_a(completions)

    torch.manual_seed(seed)
    tok = load_tokenizer(data / "tokenizer")
    lm = load_causal_lm(str(data / "init_policy"))
    disable_dropout(lm)
    reference = copy.deepcopy(lm).eval().requires_grad_(False)
    prompts = [Prompt(json.loads(line)["prompt"]) for line in (data / "rl_prompts.jsonl").read_text().splitlines()]
    reward, critic = FractionOfA(), None
    if algo == "ppo":
        rm_dir = str(data.parent / "out" / "rm_model")
        if ppo_critic == "shared":  # our default: a zero-initialised value head on the policy's trunk (value_layers
            # > 0: on a branch of copies of the policy's top layers)
            algorithm = PPO(epochs=4, minibatches=4, critic="shared", value_layers=value_layers)
        else:  # as TRL's PPOTrainer: a value model of its own, initialised from the reward model
            # (critic_layers: the reward model's bottom layers only, algo.critic_layers)
            algorithm = PPO(epochs=4, minibatches=4, critic="separate", critic_path=rm_dir, critic_layers=critic_layers)
            encoder = PromptEncoder(tok, "plain", context_length(lm), NEW)
            critic = RLStage.separate_critic(OmegaConf.create({"reward": {}}), algorithm, tok,
                                             [encoder(p.text) for p in prompts])
        if ppo_reward == "rm":
            reward = LearnedReward(rm_dir, allow_unnormalized=True, format="plain")
    elif algo == "grpo":
        algorithm = GRPO(generations=GENERATIONS, beta=0.0)
    else:
        algorithm = RLOO(generations=GENERATIONS)
    kl = {"controller": "fixed", "coef": {"grpo": 0.0, "ppo": ppo_kl}.get(algo, 0.05), "estimator": "k1"}
    # TRL's PPOTrainer cannot force a length: there, and so here, a sample may stop early at its EOS
    sampling = SamplingSettings(max_new_tokens=NEW, min_new_tokens=0 if algo == "ppo" else NEW, temperature=1.0)
    # the peers' gradient clipping: TRL 1.16's GRPO/RLOO trainers clip at transformers' default max_grad_norm 1.0;
    # TRL 1.12's PPOTrainer has its own update loop that never clips
    gradient_clip = None if algo == "ppo" else 1.0
    prompts_per_step = ppo_prompts if algo == "ppo" else PROMPTS
    per_step = prompts_per_step * int(algorithm.generations_per_prompt)
    updates = steps * int(algorithm.epochs) * int(algorithm.minibatches)
    module = RLModule(PolicyWithValue(lm, algorithm.needs_value, critic, algorithm.value_layers), reference, tok, algorithm, reward, kl, "plain", sampling,
                      PEER_ADAMW, {"warmup_steps": 0, "min_lr_ratio": 1.0}, updates,
                      no_eos_penalty=None, reward_clip=None, gradient_clip=gradient_clip, seed=seed,
                      logprobs_from_sampling=algo == "ppo" and not fresh_logprobs)
    loader = DataLoader(PromptCursor(prompts, prompts_per_step, steps, 0, start=lambda: module.iteration, rank=lambda: 0),
                        batch_size=None, collate_fn=lambda b: b)
    times, gen, rewards = [], [], []

    class Timer(pl.Callback):
        def on_train_start(self, *args):
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, *args):
            now = time.perf_counter()
            times.append(now - self.t)
            gen.append(float(trainer.callback_metrics["time/generation_s"]))
            rewards.append(float(trainer.callback_metrics["objective/raw_scores"]))
            self.t = now

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         precision=precision,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()])
    lm.train()
    trainer.fit(module, train_dataloaders=loader)
    wall = sum(times[WARMUP:])
    return {"episodes_per_s": per_step * len(times[WARMUP:]) / wall, "gen_share": sum(gen[WARMUP:]) / wall,
            "reward_first10": statistics.mean(rewards[:10]), "reward_last10": statistics.mean(rewards[-10:]),
            "rewards": rewards}


def ensure_reward_model(root: Path, trl_python: Path) -> Path:
    """The reward model of the peer's `rm` task (trained and saved by its repeat 0), made once."""
    rm_dir = root / "out" / "rm_model"
    if not (rm_dir / "config.json").exists():
        subprocess.run([str(trl_python), str(root / "bench_trl.py"), "run", "--task", "rm", "--repeat", "0"], check=True,
                       env={**os.environ, "TRL_BENCH_ROOT": str(root)}, cwd=root, capture_output=True)
    return rm_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algo", choices=("grpo", "rloo", "ppo", "dpo"), default="grpo",
                    help="dpo runs benchmarks/dpo_throughput.py (offline: its own workload and harness)")
    ap.add_argument("--repeats", type=repeats, default=3)
    ap.add_argument("--seeds", action="store_true",
                    help="repeat r of our side samples with seed r (default: seed 0 every time), to see the spread "
                         "of the reward columns; TRL's side keeps its own seed, except for PPO (our harness), "
                         "where it takes seed r too")
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ours-only", action="store_true", help="internal: run our side once and print JSON")
    ap.add_argument("--fresh-logprobs", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--critic", choices=("separate", "shared"), default="separate", help=argparse.SUPPRESS)
    ap.add_argument("--ppo-shared-critic", action="store_true",
                    help="PPO only: a third row of ours with the rl stage's default critic, a value head on the "
                         "policy's trunk (TRL's PPOTrainer has only a separate value model)")
    ap.add_argument("--value-layers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--ppo-value-layers", type=int, default=0, metavar="N",
                    help="PPO only: with N > 0, a row of ours with the value head on a branch of copies of the "
                         "policy's top N layers (algo.value_layers=N; trlX's num_value_layers_unfrozen)")
    ap.add_argument("--critic-layers", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ppo-critic-layers", type=int, default=None, metavar="K",
                    help="PPO only: our two separate-critic rows keep the reward model's bottom K layers "
                         "(algo.critic_layers=K); TRL's value model stays whole")
    ap.add_argument("--ppo-reward", choices=("rm", "a"), default="rm",
                    help="PPO's reward on both sides: the peer's reward model (rm) or the fraction of 'a' (a)")
    ap.add_argument("--ppo-kl", type=float, default=0.05,
                    help="PPO only: the KL coefficient on both sides (at 0 our side skips the reference forward; "
                         "TRL 1.12's PPOTrainer still runs it)")
    ap.add_argument("--ppo-prompts", type=int, default=PROMPTS,
                    help="PPO only: prompts per step on both sides, one sample each (64: the completions per step of "
                         "the GRPO and RLOO workloads, 16 prompts x 4 generations)")
    ap.add_argument("--bf16", action="store_true",
                    help="PPO only: bf16 mixed precision on both sides (ours: precision bf16-mixed; TRL: bf16=True)")
    ap.add_argument("--steps", type=int, default=STEPS,
                    help="PPO only: steps per run (the reward columns are the first and last 10; a longer run shows "
                         "more of the reward curve)")
    args = ap.parse_args()
    if (args.steps != STEPS or args.ppo_kl != 0.05 or args.ppo_reward != "rm" or args.ppo_prompts != PROMPTS
            or args.bf16 or args.ppo_shared_critic or args.ppo_value_layers or args.ppo_critic_layers is not None) \
            and args.algo != "ppo":
        ap.error(f"--steps, --ppo-kl, --ppo-reward, --ppo-prompts, --ppo-shared-critic, --ppo-value-layers, "
                 f"--ppo-critic-layers and --bf16 "
                 f"are for --algo ppo: TRL's {args.algo} side is the peer's own run")
    if not 0 <= args.ppo_value_layers <= 4:
        ap.error(f"--ppo-value-layers {args.ppo_value_layers}: 0 (no such row) to 4 (the policy's layers)")
    if args.ppo_critic_layers is not None and not 1 <= args.ppo_critic_layers <= 4:
        ap.error(f"--ppo-critic-layers {args.ppo_critic_layers}: 1 to 4 (the reward model's layers)")
    if args.ppo_prompts < 4 or args.ppo_prompts % 4:
        ap.error(f"--ppo-prompts {args.ppo_prompts}: a positive multiple of 4 (both sides split a step into 4 "
                 "minibatches)")
    if args.algo == "dpo":
        if args.seeds:
            ap.error("--seeds is for the on-policy algorithms: DPO's workload has no sampling")
        script = str(Path(__file__).with_name("dpo_throughput.py"))
        os.execv(sys.executable, [sys.executable, script, "--repeats", str(args.repeats),
                                  *(["--ours-only"] if args.ours_only else [])])
    if args.steps < 20:
        ap.error(f"--steps {args.steps}: at least 20 (throughput is timed after {WARMUP} warm-up steps, and the "
                 "reward columns are the first and the last 10 steps)")
    root = bench_root()
    if args.ours_only:
        print(json.dumps(run_ours(root / "data", args.algo, args.seed, args.fresh_logprobs, args.ppo_reward, args.steps,
                                  args.ppo_kl, args.ppo_prompts, "bf16-mixed" if args.bf16 else "32-true",
                                  args.critic, args.value_layers, args.critic_layers)))
        return
    trl_python = root / "venv" / "bin" / "python"
    ensure_data(root, str(trl_python) if trl_python.exists() else sys.executable)
    ppo_python = root / "venv112" / "bin" / "python"
    if args.algo == "ppo":
        ensure_reward_model(root, trl_python)
    ours, fresh, shared, branch, theirs = [], [], [], [], []
    cut = [] if args.ppo_critic_layers is None else ["--critic-layers", str(args.ppo_critic_layers)]
    rows = [(cut, ours)]
    if args.algo == "ppo":
        rows.append((["--fresh-logprobs", *cut], fresh))
        if args.ppo_shared_critic:
            rows.append((["--fresh-logprobs", "--critic", "shared"], shared))
        if args.ppo_value_layers:
            rows.append((["--fresh-logprobs", "--critic", "shared", "--value-layers", str(args.ppo_value_layers)],
                         branch))
    for r in range(args.repeats):
        for extra, results in rows:
            out = subprocess.run([sys.executable, __file__, "--ours-only", "--algo", args.algo, *extra,
                                  "--ppo-reward", args.ppo_reward, "--steps", str(args.steps),
                                  "--ppo-kl", str(args.ppo_kl), "--ppo-prompts", str(args.ppo_prompts),
                                  *(["--bf16"] if args.bf16 else []),
                                  "--seed", str(r if args.seeds else 0)], check=True, capture_output=True, text=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if args.algo == "ppo" and ppo_python.exists():
            peer = subprocess.run([str(ppo_python), str(Path(__file__).with_name("trl_ppo_peer.py")), "--repeat", str(r),
                                   "--reward", args.ppo_reward, "--steps", str(args.steps), "--kl", str(args.ppo_kl),
                                   "--prompts", str(args.ppo_prompts), *(["--bf16"] if args.bf16 else []),
                                   "--seed", str(r if args.seeds else 0)],
                                  check=True, capture_output=True, text=True, env={**os.environ, "TRL_BENCH_ROOT": str(root)})
            theirs.append({"gen_share": float("nan"), **json.loads(peer.stdout.strip().splitlines()[-1])})
        elif args.algo != "ppo" and trl_python.exists():
            theirs.append(run_trl(root, args.algo, r, KEYS))
    k = args.ppo_critic_layers
    critic_note = "" if k is None else f", critic: the reward model's bottom {k} layer{'s' if k > 1 else ''}"
    gens, per_step = (1, args.ppo_prompts) if args.algo == "ppo" else (GENERATIONS, PROMPTS)
    print_table(f"{args.algo.upper()}, {per_step} prompts x {gens} x {NEW} tokens, {args.steps} steps (window "
                f"{WARMUP + 1}-{args.steps}), median of {args.repeats}",
                [(f"rlhf-lab rl ({args.algo}{critic_note})", ours),
                 *([(f"rlhf-lab rl (ppo{critic_note}, log-probs in a fresh forward)", fresh)] if args.algo == "ppo"
                   else []),
                 *([("rlhf-lab rl (ppo, value head on the policy trunk)", shared)] if shared else []),
                 *([(f"rlhf-lab rl (ppo, value head on a branch of {args.ppo_value_layers} layer"
                     f"{'s' if args.ppo_value_layers > 1 else ''})", branch)] if branch else []),
                 ("TRL 1.12 PPOTrainer" if args.algo == "ppo" else f"TRL 1.16 {args.algo.upper()}Trainer", theirs)],
                [("episodes_per_s", "completions/s", ".1f"), ("gen_share", "generation share", ".2f"),
                 ("reward_first10", "reward, steps 1-10", ".4f"), ("reward_last10", f"reward, steps {args.steps - 9}-{args.steps}", ".4f")],
                "episodes_per_s")
    if args.seeds:
        last = [round(x["reward_last10"], 4) for x in ours]
        print(f"reward, steps {args.steps - 9}-{args.steps}, ours by seed 0..{len(ours) - 1}: {last} (spread {max(last) - min(last):.4f})")
        if args.algo == "ppo":
            for name, runs in (("ours", ours), ("ours, fresh forward", fresh), ("ours, shared critic", shared),
                               ("ours, value branch", branch), ("TRL", theirs)):
                if runs:
                    print(f"  {name} by seed: first 10 {[round(x['reward_first10'], 4) for x in runs]}, "
                          f"last 10 {[round(x['reward_last10'], 4) for x in runs]}")


if __name__ == "__main__":
    main()
