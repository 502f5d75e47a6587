"""Stage `eval`: a policy judged by a reward source (the proxy) and the task's gold, with best-of-n.

For each prompt, N samples are drawn once; for every n <= N in `bon.n`, the expected proxy and gold reward of the
best-of-n sample (best by the proxy) is computed with the unbiased estimator over all n-subsets of the N samples:
with the samples sorted by proxy ascending, the i-th (1-based) is the best of a random n-subset with probability
C(i-1, n-1) / C(N, n). The KL of best-of-n to the policy is log n - (n-1)/n (Stiennon et al. 2020; Gao et al. 2022).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping, Sequence

from framework.errors import ConfigError
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
    """Expected (proxy, gold) of the best-of-n sample of one prompt from its N samples (of samples with equal proxy
    scores, the later one counts as the better)."""
    order = sorted(range(len(proxy)), key=lambda i: proxy[i])
    w = bon_weights(len(proxy), n)
    p = sum(wi * proxy[i] for wi, i in zip(w, order))
    g = None if gold is None else sum(wi * gold[i] for wi, i in zip(w, order))
    return p, g


def bon_kl(n: int) -> float:
    return math.log(n) - (n - 1) / n


class EvalStage(Stage):
    def __init__(self, name: str = "eval", format: str = "chat", prompts: int = 64, samples_per_prompt: int = 64,
                 max_new_tokens: int = 32, temperature: float = 1.0, batch_size: int = 256,
                 bon: Mapping | None = None):
        check_format(format)
        self.name, self.format, self.n_prompts, self.n_samples = name, format, prompts, samples_per_prompt
        self.sampling = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature)
        self.batch_size = batch_size
        self.ns = [int(n) for n in (bon or {}).get("n", [1, 2, 4, 8, 16, 32, 64])]
        if not self.ns or min(self.ns) < 1 or max(self.ns) > samples_per_prompt:
            raise ConfigError(f"bon.n={self.ns}: every n must be in [1, stage.samples_per_prompt={samples_per_prompt}]")

    def run(self, ctx: StageContext) -> StageResult:
        from framework.reward import TaskGold
        from framework.stages.reward import PolicySampler

        cfg = ctx.cfg
        path = (cfg.get("policy") or {}).get("path") or cfg.model.get("path")
        if not path:
            raise ConfigError("stage=eval judges a trained policy: give policy.path=<a model dir>")
        if not cfg.get("task"):
            raise ConfigError("stage=eval draws its prompts from a task: add task=friendly_reply (or another)")
        task: Task = instantiate_plugin(cfg.task, "task", Task)
        proxy: RewardFunction = instantiate_plugin(cfg.reward, "reward", RewardFunction)
        gold = TaskGold(task)
        prompts = task.prompts(self.n_prompts, int(cfg.seed) + 7919)
        sampler = PolicySampler.from_dir(str(path), self.format, int(cfg.seed), None, self.batch_size)
        started = time.perf_counter()
        groups = sampler(prompts, self.n_samples, self.sampling.max_new_tokens, self.sampling.temperature)
        gen_s = time.perf_counter() - started
        flat = [p for p in prompts for _ in range(self.n_samples)]
        texts = [t for group in groups for t in group]
        proxy_scores = proxy.score(flat, texts)
        gold_scores = gold.score(flat, texts)
        if not all(math.isfinite(v) for v in proxy_scores + gold_scores):
            raise ConfigError("a reward returned NaN/inf on the evaluation samples")
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

    fig, ax = plt.subplots(figsize=(5, 4))
    ds = [r["d"] for r in rows]
    ax.plot(ds, [r["proxy"] - rows[0]["proxy"] for r in rows], marker="o", label="proxy (gain over n=1)")
    ax.plot(ds, [r["gold"] - rows[0]["gold"] for r in rows], marker="o", label="gold (gain over n=1)")
    for r in rows:
        ax.annotate(str(r["n"]), (r["d"], r["proxy"] - rows[0]["proxy"]), fontsize=7)
    ax.set(xlabel="d = sqrt(KL(best-of-n || policy))", ylabel="reward gain", title="best-of-n")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
