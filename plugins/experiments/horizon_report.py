"""DAgger vs behaviour cloning against the horizon T: a Hydra callback that, when a sweep ends, reads its runs back
from MLflow, tabulates and plots error against T per imitation algorithm, fits the growth exponent, and logs it all
to a report run."""

from __future__ import annotations

import math
import statistics
import warnings
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig

from framework.plots import plot_figure, save_plot
from plugins.experiments.sweep_report import SweepReport, finite_spread

ALGOS = {"plugins.imitation.bc.BehaviourCloning": "BC", "plugins.imitation.dagger.DAgger": "DAgger"}


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x (the growth exponent); None with < 2 positive points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var else None


POOLED = ("seq_error", "mistakes_per_seq", "token_error_on_expert_states", "expert_labels")
# parameters that differ between the runs of one configuration: the seed (and what follows it), output paths, and
# counts measured by the run itself
PER_RUN = ("seed", "dataset.seed", "paths.", "logger.", "data.")


def nan_mean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else float("nan")


def configurations(runs: list[dict]) -> dict[str, list[dict]]:
    """The runs of one (algorithm, T) split by whatever else differs between them (another DAgger variant, another
    dataset.n in the same sweep), apart from the seed: {"" or "key=value, ...": runs}."""
    configs = [run.get("config", {}) for run in runs]
    keys = sorted({k for c in configs for k in c if len({str(other.get(k)) for other in configs}) > 1})
    out: dict[str, list[dict]] = defaultdict(list)
    for run, c in zip(runs, configs):
        out[", ".join(f"{k}={c.get(k)}" for k in keys)].append(run)
    return out


def pool_seeds(runs: list[dict], tokens_per_step: int) -> list[dict]:
    """One row per configuration (algorithm, T and any other swept parameter but the seed): the mean over its seeds
    of each measure (NaNs left out), the standard deviation of the mistakes (0 for one seed), the amplification of
    the means (mean mistakes over (states x mean token error), defined while any seed has a token error), and the
    mistakes per failed sequence (of the means). `seeds` counts distinct seeds; runs that repeat a seed (a rerun
    into the same sweep folder) are averaged too, with a warning."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        groups[(run["algorithm"], run["T"])].append(run)
    rows = []
    for (algo, horizon), same in sorted(groups.items()):
        for variant, rs in sorted(configurations(same).items()):
            label = f"{algo} [{variant}]" if variant else algo
            seeds = len({str(r.get("seed")) for r in rs})
            if seeds < len(rs):
                warnings.warn(f"{label}, T = {horizon}: {len(rs)} runs of {seeds} distinct seed(s) are averaged "
                              "(a rerun into the same sweep folder?)", stacklevel=2)
            row = {"algorithm": label, "T": horizon, "seeds": seeds}
            row.update({k: nan_mean(r[k] for r in rs) for k in POOLED})
            row["mistakes_sd"] = finite_spread([r["mistakes_per_seq"] for r in rs])
            eps = row["token_error_on_expert_states"]
            row["amplification"] = (row["mistakes_per_seq"] / ((tokens_per_step * horizon + 1) * eps)
                                    if eps > 0 else float("nan"))
            # what one failed sequence costs: ~1 when the learner slips and recovers, up to ~T when a slip compounds
            row["mistakes_per_failure"] = (row["mistakes_per_seq"] / row["seq_error"] if row["seq_error"] > 0
                                           else float("nan"))
            rows.append(row)
    return rows


class HorizonReport(SweepReport):
    """on_multirun_end: one row per (algorithm, T) from the runs tagged with this sweep's directory; the runs of
    several seeds (`seed=1,2,3` in the sweep) are pooled into their mean and spread."""

    kind = "horizon_report"

    def __init__(self, horizon_key: str = "task.length", tokens_per_step: int = 1,
                 horizon_label: str = "horizon T (digits to sort)"):
        """tokens_per_step: response tokens per step of the horizon (2 for an action and its observation); with the
        stop token, an episode is tokens_per_step * T + 1 labelled states. horizon_label: the figure's x axis."""
        self.horizon_key, self.tokens_per_step, self.horizon_label = horizon_key, tokens_per_step, horizon_label

    def collect(self, config: DictConfig) -> list[dict]:
        """One row per finished run (per algorithm, T and seed)."""
        rows = []
        for r in self.sweep_runs(config, "sft"):
            m, p = r.data.metrics, r.data.params
            if "eval/exact_match" not in m:
                continue
            horizon = int(p[f"{self.horizon_key}"])
            token_error = 1.0 - m.get("val/token_accuracy", float("nan"))
            mistakes = m.get("eval/mistakes_per_seq", float("nan"))
            rows.append({
                "algorithm": ALGOS.get(p.get("imitation._target_"), p.get("imitation._target_")),
                "T": horizon, "seed": p.get("seed", "?"), "seq_error": 1.0 - m["eval/exact_match"],
                "mistakes_per_seq": mistakes,
                "token_error_on_expert_states": token_error,
                "expert_labels": m.get("imitation/expert_labels", float("nan")), "run_id": r.info.run_id,
                "config": {k: v for k, v in p.items() if not k.startswith(PER_RUN)},
            })
        return sorted(rows, key=lambda row: (row["algorithm"], row["T"], str(row["seed"])))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        runs = self.collect(config)
        rows = pool_seeds(runs, self.tokens_per_step)
        if not rows:
            print("[rlhf] horizon report: no finished runs in this sweep")
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        by_algo: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            by_algo[row["algorithm"]].append(row)
        slopes = {a: loglog_slope([r["T"] + 1 for r in rs], [r["mistakes_per_seq"] for r in rs]) for a, rs in by_algo.items()}

        header = (f"{'algorithm':<8} {'T':>4} {'seeds':>5} {'seq err':>8} {'mistakes':>9} {'sd':>7} {'/failed':>7} "
                  f"{'tok err':>8} {'ampl.':>6} {'labels':>7}")
        lines = [header] + [f"{r['algorithm']:<8} {r['T']:>4} {r['seeds']:>5} {r['seq_error']:>8.3f} "
                            f"{r['mistakes_per_seq']:>9.3f} {r['mistakes_sd']:>7.3f} {r['mistakes_per_failure']:>7.2f} "
                            f"{r['token_error_on_expert_states']:>8.4f} {r['amplification']:>6.2f} "
                            f"{r['expert_labels']:>7.0f}" for r in rows]
        lines += [f"growth exponent of mistakes/seq in (T+1), {a}: {s:.2f}" for a, s in slopes.items() if s is not None]
        print("[rlhf] DAgger vs BC by horizon\n" + "\n".join(lines))

        png = sweep_dir / "horizon_report.png"
        self.plot(by_algo, png, self.horizon_label)
        metrics = [(f"{r['algorithm']}/{k}", r[k], r["T"]) for r in rows for k in ("mistakes_per_seq", "seq_error")]
        metrics += [(f"{a}/growth_exponent", s, 0) for a, s in slopes.items() if s is not None]
        self.publish(config, rows, lines, png, metrics, extra={
            "growth_exponent": slopes, "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs]})

    @staticmethod
    def plot(by_algo: dict[str, list[dict]], path: Path, horizon_label: str = "horizon T (digits to sort)") -> None:
        plt, fig, axes = plot_figure(2, width=5.0)
        for algo, rs in sorted(by_algo.items()):
            ts = [r["T"] for r in rs]
            axes[0].errorbar(ts, [r["mistakes_per_seq"] for r in rs], yerr=[r.get("mistakes_sd", 0.0) for r in rs],
                             marker="o", capsize=3, label=algo)
            axes[1].plot(ts, [r["seq_error"] for r in rs], marker="o", label=algo)
        axes[0].set(xlabel=horizon_label, ylabel="mistakes per sequence (learner's own states)",
                    title="cumulative per-step cost")
        axes[1].set(xlabel=horizon_label, ylabel="sequence error (1 - exact match)",
                    title="sequence-level error", ylim=(0, 1.05))
        save_plot(plt, fig, axes, path)
