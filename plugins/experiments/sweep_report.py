"""The part every sweep report shares: read the runs of this Hydra sweep back from MLflow (each job is tagged with
`sweep=${hydra:sweep.dir}`), then publish the table, the figure and a few metrics to a `stage=report` run and to
the sweep's folder.

To add runs to an earlier sweep (more seeds, another proxy), run the new sweep with
`logger.tags.sweep=<the earlier sweep's folder>`: its jobs carry the earlier tag, and its report pools both."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Mapping, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from framework.tracking import open_run, resolve_tracking_uri


def spread(values: list[float]) -> float:
    """Sample standard deviation; 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def finite_spread(values) -> float:
    """spread() of the values that are not NaN; NaN when none is."""
    finite = [v for v in values if not math.isnan(v)]
    return spread(finite) if finite else float("nan")


def metric_name(name: str) -> str:
    """A name MLflow accepts for a metric: alphanumerics, "_", "-", ".", " ", ":" and "/" only, no empty path part
    ("rl//alpha") and no "." or ".." part; labels built from run parameters (paths, "k=v" lists) may hold others."""
    name = re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name)
    parts = [part if part.strip(".") else part.replace(".", "_") for part in name.split("/") if part]
    return "/".join(parts) or "_"


class SweepReport(Callback):
    kind = "report"

    @staticmethod
    def sweep_tag(config: DictConfig) -> str:
        """The `sweep` tag of this sweep's jobs: `logger.tags.sweep` when given on the command line (a folder of an
        earlier sweep, to pool with it), else the sweep folder (the default `${hydra:sweep.dir}`)."""
        tags = OmegaConf.select(config, "logger.tags")
        tag = OmegaConf.to_container(tags, resolve=False).get("sweep") if OmegaConf.is_dict(tags) else None
        return str(tag) if tag and "${" not in str(tag) else str(config.hydra.sweep.dir)

    def sweep_runs(self, config: DictConfig, stage: str) -> list:
        from mlflow import MlflowClient

        sweep = self.sweep_tag(config)
        client = MlflowClient(resolve_tracking_uri(config.logger.get("tracking_uri"), config.paths.root))
        exp = client.get_experiment_by_name(config.logger.experiment_name)
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], filter_string=f"tags.sweep = '{sweep}' and tags.stage = '{stage}'")

    def publish(self, config: DictConfig, rows: list[dict], lines: list[str], png: Path,
                metrics: Sequence[tuple[str, float, int]], extra: Mapping | None = None) -> str:
        """Write <kind>.json next to the sweep and a report run with the metrics (name, value, step), the table,
        the figure and the text; returns the report run id."""
        sweep_dir = Path(str(config.hydra.sweep.dir))
        (sweep_dir / f"{self.kind}.json").write_text(json.dumps({"rows": rows, **dict(extra or {})}, indent=1))
        tracked = open_run(config.logger, config.paths.root, self.kind.replace("_", "-"),
                           {"stage": "report", "sweep": self.sweep_tag(config), "kind": self.kind})
        for name, value, step in metrics:
            tracked.client.log_metric(tracked.run_id, metric_name(name), value, step=step)
        tracked.log_table({k: [r[k] for r in rows] for k in rows[0]}, f"{self.kind}_table.json")
        tracked.client.log_artifact(tracked.run_id, str(png))
        tracked.log_text("\n".join(lines), f"{self.kind}.txt")
        tracked.end()
        print(f"[rlhf] {self.kind}: {png} (MLflow run {tracked.run_id})")
        return tracked.run_id
