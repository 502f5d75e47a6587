"""Stage `eval`: a policy judged by a reward source (the proxy) and the task's gold, with best-of-n.

For each prompt, N samples are drawn once; for every n <= N in `bon.n`, the expected proxy and gold reward of the
best-of-n sample (best by the proxy) is computed with the unbiased estimator over all n-subsets of the N samples:
with the samples sorted by proxy ascending, the i-th (1-based) is the best of a random n-subset with probability
C(i-1, n-1) / C(N, n). The KL of best-of-n to the policy is log n - (n-1)/n (Stiennon et al. 2020; Gao et al. 2022).
`bon.n` is sorted and de-duplicated, and n = 1 (the policy itself, the base of every gain) is always included: the
final `bon/*` metrics are those of the largest n.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping, Sequence

from framework.errors import ConfigError, refuse_unknown_keys
from framework.imitation import check_format
from framework.instantiate import instantiate_plugin
from framework.interfaces import RewardFunction, Stage, StageContext, StageResult, Task
from framework.rollout import SamplingSettings


def bon_weights(n_samples: int, n: int) -> list[float]:
    """P(the i-th smallest of N is the largest of a uniformly random n-subset), i = 1..N."""
    if not 1 <= n <= n_samples:
        raise ValueError(f"best-of-{n} needs 1 <= n <= N={n_samples}")
    total = math.comb(n_samples, n)
    return [math.comb(i - 1, n - 1) / total for i in range(1, n_samples + 1)]


def best_of_n(proxy: Sequence[float], gold: Sequence[float] | None, n: int) -> tuple[float, float | None]:
    """Expected (proxy, gold) of the best-of-n sample of one prompt from its N samples. Of samples tied on the proxy,
    best-of-n picks one at random: tied samples share the weight of the ranks they take (a rule by position would
    bias the gold towards whichever sample came first or last)."""
    order = sorted(range(len(proxy)), key=lambda i: proxy[i])
    w = bon_weights(len(proxy), n)
    start = 0
    while start < len(order):  # each run of equal proxy scores takes the mean of its ranks' weights
        end = start
        while end + 1 < len(order) and proxy[order[end + 1]] == proxy[order[start]]:
            end += 1
        w[start:end + 1] = [sum(w[start:end + 1]) / (end + 1 - start)] * (end + 1 - start)
        start = end + 1
    p = sum(wi * proxy[i] for wi, i in zip(w, order))
    g = None if gold is None else sum(wi * gold[i] for wi, i in zip(w, order))
    return p, g


def bon_kl(n: int) -> float:
    return math.log(n) - (n - 1) / n


def bon_sizes(ns, samples_per_prompt: int) -> list[int]:
    """`bon.n` as the stage uses it: integers in [1, N], sorted, without repeats, with n = 1 added when missing (the
    policy itself: the base of the plot's gains). A single number is a list of one."""
    values = list(ns) if isinstance(ns, Sequence) and not isinstance(ns, str) else [ns]
    if not values:
        raise ConfigError("bon.n=[]: give at least one best-of-n size, e.g. bon.n=[1,2,4,8]")
    bad = [n for n in values if isinstance(n, bool) or not isinstance(n, int)]
    if bad:
        raise ConfigError(f"bon.n={values}: best-of-n sizes must be whole numbers ({bad[0]!r} is not), "
                          "e.g. bon.n=[1,2,4,8]")
    out_of_range = [n for n in values if not 1 <= n <= samples_per_prompt]
    if out_of_range:
        raise ConfigError(f"bon.n={values}: every n must be in [1, stage.samples_per_prompt={samples_per_prompt}] "
                          f"({out_of_range[0]} is not); lower it or raise stage.samples_per_prompt")
    return sorted(set(values) | {1})


def check_finite(out_dir: Path, prompts: Sequence, completions: Sequence[str],
                 scores: Mapping[str, tuple[RewardFunction, Sequence[float]]]) -> None:
    """Stop when a reward returned NaN/inf on the evaluation samples: for each such reward (`scores`: role ->
    (reward source, its scores)), the offending samples go to <out_dir>/nonfinite_rewards_eval_<role>.jsonl, and
    the message names the role, the reward's class, the count and the file."""
    from framework.reward import NonFiniteReward, save_nonfinite_samples

    problems = []
    for role, (reward, values) in scores.items():
        path = out_dir / f"nonfinite_rewards_eval_{role}.jsonl"
        bad = save_nonfinite_samples(path, prompts, completions, values)
        if bad:
            task = getattr(reward, "task", None)  # the gold: TaskGold around the task's own scorer
            name = type(reward).__name__ + (f" (task {type(task).__name__})" if task is not None else "")
            problems.append(f"the {role} reward {name} returned NaN/inf for {bad} of {len(values)} samples (saved "
                            f"in {path})")
    if problems:
        raise NonFiniteReward(f"{'; '.join(problems)}. No best-of-n result was logged: fix the reward source for "
                              "these samples (reward=learned: is the reward model finite on them?) and run the "
                              "evaluation again")


class EvalStage(Stage):
    def __init__(self, name: str = "eval", format: str = "chat", prompts: int = 64, samples_per_prompt: int = 64,
                 max_new_tokens: int = 32, temperature: float = 1.0, batch_size: int = 256,
                 bon: Mapping | None = None):
        check_format(format)
        for key, value in (("prompts", prompts), ("samples_per_prompt", samples_per_prompt),
                           ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if value < 1:  # checked before any model is loaded (batch_size 0 failed after sampling had started)
                raise ConfigError(f"stage.{key}={value} must be >= 1")
        if not temperature > 0:
            raise ConfigError(f"stage.temperature={temperature} must be > 0 (the log-probs divide by it)")
        self.name, self.format, self.n_prompts, self.n_samples = name, format, prompts, samples_per_prompt
        self.sampling = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature)
        self.batch_size = batch_size
        refuse_unknown_keys("bon", bon or {}, ("n",))
        self.ns = bon_sizes((bon or {}).get("n", [1, 2, 4, 8, 16, 32, 64]), samples_per_prompt)

    def run(self, ctx: StageContext) -> StageResult:
        from framework.reward import TaskGold, reward_scores
        from framework.stages.common import policy_path
        from framework.stages.reward import PolicySampler

        cfg = ctx.cfg
        path, key = policy_path(cfg)
        if not path:
            raise ConfigError("stage=eval judges a trained policy: give policy.path=<a model dir>")
        if not cfg.get("task"):
            raise ConfigError("stage=eval draws its prompts from a task: add task=friendly_reply (or another)")
        task: Task = instantiate_plugin(cfg.task, "task", Task)
        proxy: RewardFunction = instantiate_plugin(cfg.reward, "reward", RewardFunction)
        gold = TaskGold(task)
        prompts = task.prompts(self.n_prompts, int(cfg.seed) + 7919)
        sampler = PolicySampler.from_dir(path, self.format, int(cfg.seed), None, self.batch_size, key)
        started = time.perf_counter()
        groups = sampler(prompts, self.n_samples, self.sampling.max_new_tokens, self.sampling.temperature)
        gen_s = time.perf_counter() - started
        flat = [p for p in prompts for _ in range(self.n_samples)]
        texts = [t for group in groups for t in group]
        import torch

        # float64: the scores as the sources gave them (float32 would round what best_of_n.json records)
        proxy_scores = reward_scores(proxy, proxy.score(flat, texts), len(texts), dtype=torch.float64).tolist()
        gold_scores = reward_scores(gold, gold.score(flat, texts), len(texts), dtype=torch.float64).tolist()
        check_finite(ctx.output_dir, flat, texts, {"proxy": (proxy, proxy_scores), "gold": (gold, gold_scores)})
        k = self.n_samples
        rows = []
        for n in self.ns:
            per_prompt = [best_of_n(proxy_scores[i * k : (i + 1) * k], gold_scores[i * k : (i + 1) * k], n)
                          for i in range(len(prompts))]
            kl = bon_kl(n)
            rows.append({"n": n, "kl": kl, "d": math.sqrt(kl),
                         "proxy": sum(p for p, _ in per_prompt) / len(per_prompt),
                         "gold": sum(g for _, g in per_prompt) / len(per_prompt)})
        for r in rows:  # one step per n
            for key in ("proxy", "gold", "kl", "d"):
                ctx.run.client.log_metric(ctx.run.run_id, f"bon/{key}", r[key], step=r["n"])
        out_dir = ctx.output_dir / "eval"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "best_of_n.json").write_text(json.dumps({"policy": str(path), "rows": rows,
                                                            "prompts": len(prompts), "samples_per_prompt": k}, indent=1))
        png = out_dir / "best_of_n.png"
        plot_bon(rows, png)
        ctx.run.log_table({key: [r[key] for r in rows] for key in rows[0]}, "best_of_n.json")
        ctx.run.client.log_artifact(ctx.run.run_id, str(png))
        ctx.run.log_table({"prompt": [p.text for p in flat[:: k][:16]], "completion": texts[:: k][:16],
                           "proxy": proxy_scores[:: k][:16], "gold": gold_scores[:: k][:16]}, "samples.json")
        print(f"[rlhf] best-of-n on {len(prompts)} prompts x {k} samples ({gen_s:.1f}s to sample)")
        print(f"{'n':>4} {'KL':>7} {'proxy':>8} {'gold':>8}")
        for r in rows:
            print(f"{r['n']:>4} {r['kl']:>7.3f} {r['proxy']:>8.4f} {r['gold']:>8.4f}")
        best = rows[-1]
        return StageResult(artifact_dir=out_dir, metrics={"bon/proxy": best["proxy"], "bon/gold": best["gold"]})


def plot_bon(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["n"])
    base = rows[0]  # n = 1 in the stage (`bon_sizes` adds it): the policy itself
    fig, ax = plt.subplots(figsize=(5, 4))
    ds = [r["d"] for r in rows]
    ax.plot(ds, [r["proxy"] - base["proxy"] for r in rows], marker="o", label=f"proxy (gain over n={base['n']})")
    ax.plot(ds, [r["gold"] - base["gold"] for r in rows], marker="o", label=f"gold (gain over n={base['n']})")
    for r in rows:
        ax.annotate(str(r["n"]), (r["d"], r["proxy"] - base["proxy"]), fontsize=7)
    ax.set(xlabel="d = sqrt(KL(best-of-n || policy))", ylabel="reward gain", title="best-of-n")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
