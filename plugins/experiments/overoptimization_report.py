"""Reward over-optimisation (Gao et al. 2022, "Scaling laws for reward model overoptimization"): a Hydra callback
that, when the sweep ends, reads back the PPO runs (eval/gold_reward, eval/proxy_reward, eval/kl per evaluation)
and the best-of-n runs (bon/gold, bon/proxy, bon/d per n), expresses every point as a gain over the starting
policy against d = sqrt(KL), fits the paper's forms to the gold gain (best-of-n: d (alpha - beta d); RL:
d (alpha - beta log d)), and logs table, fits and figure to a report run. Runs of several seeds (`seed=0,1,2` in
the sweep) are pooled per (method, proxy): one fit to all their points, the observed peak as mean and spread over
seeds, how much gold each seed lost after its peak (to its last evaluation), and the figure's curves averaged over
seeds at each evaluation."""

from __future__ import annotations

import ast
import json
import math
import statistics
from pathlib import Path
from typing import Mapping

from omegaconf import DictConfig

from framework.plots import plot_figure, save_plot
from plugins.experiments.sweep_report import SweepReport, spread


def fit_gold(ds: list[float], gains: list[float], form: str) -> tuple[float, float] | None:
    """Least squares (no intercept) of gain = alpha d - beta f(d), f = d (bon) or d log d (rl); None when the
    points cannot determine both coefficients."""
    pts = [(d, g) for d, g in zip(ds, gains) if d > 0 and math.isfinite(g)]
    if len(pts) < 2:
        return None
    x1 = [d for d, _ in pts]
    x2 = [-(d * d if form == "bon" else d * math.log(d)) for d, _ in pts]
    y = [g for _, g in pts]
    a11, a12, a22 = sum(v * v for v in x1), sum(u * v for u, v in zip(x1, x2)), sum(v * v for v in x2)
    b1, b2 = sum(u * v for u, v in zip(x1, y)), sum(u * v for u, v in zip(x2, y))
    det = a11 * a22 - a12 * a12
    if abs(det) < 1e-12:
        return None
    return (b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det


def gold_peak(alpha: float, beta: float, form: str) -> float | None:
    """d at which the fitted gold gain peaks (None when it never turns down: beta <= 0)."""
    if beta <= 0:
        return None
    return alpha / (2 * beta) if form == "bon" else math.exp(alpha / beta - 1)


def fitted(alpha: float, beta: float, form: str, d: float) -> float:
    if d <= 0:
        return 0.0
    return d * (alpha - beta * (d if form == "bon" else math.log(d)))


def by_seed(points: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in points:
        out.setdefault(str(p.get("seed", "?")), []).append(p)
    return out


def mean_curve(points: list[dict]) -> list[dict]:
    """The seeds' points averaged at each evaluation (PPO iteration, best-of-n n), sorted by mean d; one seed's
    points come back as they are, with gold_gain_sd 0."""
    steps: dict[float, list[dict]] = {}
    for p in points:
        steps.setdefault(p["step"], []).append(p)
    out = [{"step": step, "seeds": len(ps), "d": statistics.mean(p["d"] for p in ps),
            "kl": statistics.mean(p["kl"] for p in ps), "gold_gain": statistics.mean(p["gold_gain"] for p in ps),
            "proxy_gain": statistics.mean(p["proxy_gain"] for p in ps),
            "gold_gain_sd": spread([p["gold_gain"] for p in ps])} for step, ps in steps.items()]
    return sorted(out, key=lambda p: p["d"])


def proxy_size(path: str) -> float | None:
    """Millions of parameters in a saved model dir's safetensors (tied weights are stored once); None without any."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                total += math.prod(st.get_slice(name).get_shape())
    return total / 1e6


def proxy_label(path: str) -> str:
    """"<n> labels <size>M": a proxy's label budget and size (proxies of one budget and several sizes stay apart)."""
    config = Path(path) / "config.json"
    n = None
    if config.is_file():
        n = (json.loads(config.read_text()).get("rlhf_reward") or {}).get("train_comparisons")
    size = proxy_size(path)
    name = f"{n} labels" if n else (Path(path).parent.name or str(path))
    return name + (f" {size:.1f}M" if size else "")


def reward_label(params: Mapping[str, str]) -> str:
    """A run's reward in the report: a learned proxy by its budget and size, an ensemble by its aggregate and
    members, any other reward (reward=gold, the control that optimises the gold itself) by its class name."""
    path = params.get("reward.path")
    if path and path != "None":
        return proxy_label(path)
    paths = params.get("reward.paths")
    if paths and paths != "None":  # reward=ensemble: its aggregate and its members
        try:
            members = [str(m) for m in ast.literal_eval(paths)]
        except (ValueError, SyntaxError):
            members = [paths]
        return f"ensemble {params.get('reward.aggregate', '')} of " + " + ".join(proxy_label(m) for m in members)
    return params.get("reward._target_", "reward").rsplit(".", 1)[-1]


def label_order(key: tuple[str, str]) -> tuple:
    """(method, label) keys in reading order: proxies by their label budget (100 before 1000), then the rest."""
    method, label = key
    digits = label.split(" ", 1)[0]
    return (method, 0, int(digits), label) if digits.isdigit() else (method, 1, 0, label)


class OveroptimizationReport(SweepReport):
    kind = "overoptimization"

    def curves(self, config: DictConfig) -> dict[tuple[str, str], list[dict]]:
        """{(method, proxy label): [{seed, step, d, gold_gain, proxy_gain, kl}, ...]}: the points of every seed's
        run, each a gain over that run's own start, sorted by d."""
        from mlflow import MlflowClient

        from framework.tracking import resolve_tracking_uri

        client = MlflowClient(resolve_tracking_uri(config.logger.get("tracking_uri"), config.paths.root))
        out: dict[tuple[str, str], list[dict]] = {}
        for stage, method in (("rl", "rl"), ("eval", "bon")):
            for run in self.sweep_runs(config, stage):
                label = reward_label(run.data.params)
                seed = run.data.params.get("seed", "?")
                hist = lambda key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}  # noqa: E731
                if method == "rl":
                    gold, proxy, kl = hist("eval/gold_reward"), hist("eval/proxy_reward"), hist("eval/kl")
                    steps = sorted(set(gold) & set(proxy) & set(kl))
                    base = steps[0] if steps else None
                    points = [{"seed": seed, "step": s, "kl": kl[s], "d": math.sqrt(max(kl[s], 0.0)),
                               "gold_gain": gold[s] - gold[base], "proxy_gain": proxy[s] - proxy[base]}
                              for s in steps]
                else:
                    gold, proxy, d = hist("bon/gold"), hist("bon/proxy"), hist("bon/d")
                    steps = sorted(set(gold) & set(proxy) & set(d))
                    base = 1 if 1 in gold else (steps[0] if steps else None)
                    points = [{"seed": seed, "step": n, "kl": d[n] ** 2, "d": d[n], "gold_gain": gold[n] - gold[base],
                               "proxy_gain": proxy[n] - proxy[base]} for n in steps]
                out.setdefault((method, label), []).extend(points)
        return {key: sorted(pts, key=lambda p: p["d"]) for key, pts in out.items() if pts}

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        curves = self.curves(config)
        if not curves:
            print(f"[rlhf] {self.kind}: no finished runs in this sweep")
            return
        rows, lines, metrics = [], [], []
        lines.append(f"{'method':<6} {'proxy':<18} {'seeds':>5} {'points':>6} {'max d':>6} {'max proxy gain':>14} "
                     f"{'max gold gain':>13} {'peak d (observed)':>17} {'fall after peak':>15} {'alpha':>8} {'beta':>8} "
                     f"{'fit peak d':>10}")
        for (method, label), pts in sorted(curves.items(), key=lambda kv: label_order(kv[0])):
            fit = fit_gold([p["d"] for p in pts], [p["gold_gain"] for p in pts], method)
            alpha, beta = fit if fit else (math.nan, math.nan)
            peak = gold_peak(alpha, beta, method) if fit else None
            runs = list(by_seed(pts).values())
            best = [max(run, key=lambda p: p["gold_gain"]) for run in runs]  # each seed's peak
            # how much gold each seed lost from its peak to its last evaluation (0: still at its best)
            falls = [b["gold_gain"] - max(run, key=lambda p: p["step"])["gold_gain"] for b, run in zip(best, runs)]
            row = {"method": method, "proxy": label, "seeds": len(best), "points": len(pts),
                   "max_d": max(p["d"] for p in pts), "max_proxy_gain": max(p["proxy_gain"] for p in pts),
                   "max_gold_gain": statistics.mean(p["gold_gain"] for p in best),
                   "max_gold_gain_sd": spread([p["gold_gain"] for p in best]), "alpha": alpha, "beta": beta,
                   "fit_peak_d": math.nan if peak is None else peak,
                   "best_observed_d": statistics.mean(p["d"] for p in best),
                   "best_observed_d_sd": spread([p["d"] for p in best]),
                   "fall_after_peak": statistics.mean(falls), "fall_after_peak_sd": spread(falls),
                   "fall_after_peak_max": max(falls)}
            rows.append(row)
            observed = f"{row['best_observed_d']:.2f} ± {row['best_observed_d_sd']:.2f}"
            fall = f"{row['fall_after_peak']:.3f} ± {row['fall_after_peak_sd']:.3f}"
            lines.append(f"{method:<6} {label:<18} {len(best):>5} {len(pts):>6} {row['max_d']:>6.2f} "
                         f"{row['max_proxy_gain']:>14.3f} {row['max_gold_gain']:>13.3f} {observed:>17} {fall:>15} "
                         f"{alpha:>8.3f} {beta:>8.3f} {row['fit_peak_d']:>10.2f}")
            key = f"{method}/{label.replace(' ', '_')}"
            metrics += [(f"{key}/alpha", alpha, 0), (f"{key}/beta", beta, 0),
                        (f"{key}/observed_peak_d", row["best_observed_d"], 0),
                        (f"{key}/fall_after_peak", row["fall_after_peak"], 0)]
            for i, p in enumerate(mean_curve(pts)):
                metrics += [(f"{key}/gold_gain", p["gold_gain"], i), (f"{key}/proxy_gain", p["proxy_gain"], i),
                            (f"{key}/d", p["d"], i)]
        print("[rlhf] over-optimisation: gold and proxy gain against d = sqrt(KL)\n" + "\n".join(lines))
        png = Path(str(config.hydra.sweep.dir)) / f"{self.kind}.png"
        self.plot(curves, rows, png)
        self.publish(config, rows, lines, png, [m for m in metrics if math.isfinite(m[1])],
                     extra={"curves": {f"{m}|{lab}": pts for (m, lab), pts in curves.items()}})

    @staticmethod
    def plot(curves: dict, rows: list[dict], path: Path) -> None:
        """Per method: the gold gain (left axis, with the fit and, for several seeds, their spread) and the proxy
        gain (right axis, dashed: its normalised units are not the gold's) against d."""
        fits = {(r["method"], r["proxy"]): (r["alpha"], r["beta"]) for r in rows}
        panels = [(m, t) for m, t in (("bon", "best-of-n"), ("rl", "PPO")) if any(k[0] == m for k in curves)]
        plt, fig, axes = plot_figure(len(panels), width=5.5)
        for ax, (method, title) in zip(axes, panels):
            right = ax.twinx()
            for (m, label), pts in sorted(curves.items(), key=lambda kv: label_order(kv[0])):
                if m != method:
                    continue
                mean = mean_curve(pts)
                ds = [p["d"] for p in mean]
                line, = ax.plot(ds, [p["gold_gain"] for p in mean], marker="o", label=label)
                if any(p["gold_gain_sd"] > 0 for p in mean):  # several seeds: their spread at each evaluation
                    ax.errorbar(ds, [p["gold_gain"] for p in mean], yerr=[p["gold_gain_sd"] for p in mean],
                                fmt="none", ecolor=line.get_color(), alpha=0.5, capsize=2)
                right.plot(ds, [p["proxy_gain"] for p in mean], linestyle="--", color=line.get_color())
                alpha, beta = fits[(m, label)]
                if math.isfinite(alpha):
                    grid = [max(ds) * k / 50 for k in range(1, 51)]
                    ax.plot(grid, [fitted(alpha, beta, method, d) for d in grid], color=line.get_color(),
                            linewidth=0.8, alpha=0.6)
            ax.set(xlabel="d = sqrt(KL to the starting policy)", ylabel="gold reward gain over the start (—)",
                   title=title)
            right.set_ylabel("proxy reward gain, normalised units (- -)")
            (lo, hi), (rlo, rhi) = ax.get_ylim(), right.get_ylim()
            if hi > 0 and rhi > 0:  # zero at the same height on both axes
                low = min(lo / hi, rlo / rhi)
                ax.set_ylim(low * hi, hi)
                right.set_ylim(low * rhi, rhi)
            # one entry per proxy (its colour; solid gold, dashed proxy), below the panel so that no curve is hidden
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)
        save_plot(plt, fig, axes, path)
