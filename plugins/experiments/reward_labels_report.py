"""Reward-model quality against the number of labels (Christiano et al. 2017; Gao et al. 2022): a Hydra callback
that, when the sweep ends, tabulates and plots gold agreement and Spearman correlation with gold against the number
of comparisons, one curve per label-noise level, and logs it all to a report run."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from omegaconf import DictConfig

from framework.plots import plot_figure, save_plot
from plugins.experiments.sweep_report import SweepReport


class RewardLabelsReport(SweepReport):
    kind = "reward_vs_labels"

    def __init__(self, labels_key: str = "dataset.n", noise_key: str = "labeller.tau"):
        self.labels_key, self.noise_key = labels_key, noise_key

    def collect(self, config: DictConfig) -> list[dict]:
        rows = []
        for r in self.sweep_runs(config, "reward_model"):
            m, p = r.data.metrics, r.data.params
            if "val/gold_accuracy" not in m:
                continue
            rows.append({"labels": int(p[self.labels_key]), "noise": float(p[self.noise_key]),
                         "train_pairs": int(p.get("data.train_pairs", 0)), "gold_accuracy": m["val/gold_accuracy"],
                         "spearman_gold": m.get("val/spearman_gold", math.nan),
                         "label_accuracy": m.get("val/accuracy", math.nan),
                         "calibration_error": m.get("val/calibration_error", math.nan), "run_id": r.info.run_id})
        return sorted(rows, key=lambda row: (row["noise"], row["labels"]))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        rows = self.collect(config)
        if not rows:
            print(f"[rlhf] {self.kind}: no finished runs in this sweep")
            return
        by_noise: dict[float, list[dict]] = defaultdict(list)
        for row in rows:
            by_noise[row["noise"]].append(row)
        for rs in by_noise.values():  # gain in gold agreement since the previous (smaller) label budget
            for prev, row in zip([None] + rs[:-1], rs):
                row["gain"] = math.nan if prev is None else row["gold_accuracy"] - prev["gold_accuracy"]
        lines = [f"{'noise':>6} {'labels':>7} {'pairs':>6} {'gold acc':>9} {'gain':>7} {'spearman':>9} "
                 f"{'label acc':>10} {'ECE':>6}"]
        lines += [f"{r['noise']:>6g} {r['labels']:>7} {r['train_pairs']:>6} {r['gold_accuracy']:>9.3f} "
                  f"{r['gain']:>+7.3f} {r['spearman_gold']:>9.3f} {r['label_accuracy']:>10.3f} "
                  f"{r['calibration_error']:>6.3f}" for r in rows]
        print(f"[rlhf] reward model vs number of labels ({self.noise_key} = label noise)\n" + "\n".join(lines))
        png = Path(str(config.hydra.sweep.dir)) / f"{self.kind}.png"
        self.plot(by_noise, png, self.noise_key)
        metrics = [(f"noise_{r['noise']:g}/{k}", r[k], r["labels"]) for r in rows
                   for k in ("gold_accuracy", "spearman_gold") if not math.isnan(r[k])]
        self.publish(config, rows, lines, png, metrics)

    @staticmethod
    def plot(by_noise: dict[float, list[dict]], path: Path, noise_key: str) -> None:
        plt, fig, axes = plot_figure(2, width=5.0)
        for noise, rs in sorted(by_noise.items()):
            xs = [r["labels"] for r in rs]
            axes[0].plot(xs, [r["gold_accuracy"] for r in rs], marker="o", label=f"{noise_key}={noise:g}")
            axes[1].plot(xs, [r["spearman_gold"] for r in rs], marker="o", label=f"{noise_key}={noise:g}")
        ticks = sorted({r["labels"] for rs in by_noise.values() for r in rs})
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        axes[0].set(xlabel="comparisons (labels)", ylabel="agreement with gold preferences",
                    title="held-out gold agreement")
        axes[1].set(xlabel="comparisons (labels)", ylabel="Spearman(RM score, gold score)",
                    title="rank correlation with gold")
        save_plot(plt, fig, axes, path)
