"""`rlhf compare` (also `rlhf-compare`): read runs back from an MLflow store (the local one by default, or a server),
print their params and final/best metrics side by side, and plot them: each metric against step with a line per
run, and for RL runs the gold reward against sqrt(KL). The PNGs go to a folder and, unless --no-log, to a
`stage=compare` run in the same experiment.

    rlhf compare --tag pipeline=chatgpt --stage rl              # the RL runs of every pipeline run
    rlhf compare --runs <id1>,<id2> --metrics eval/gold_reward,objective/kl
    rlhf compare --tracking-uri http://127.0.0.1:5000 --experiment rlhf-lab --filter "params.seed = '42'"
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Sequence

from framework.errors import ConfigError, RLHFError, TrackingError
from framework.plots import plot_figure, save_plot
from framework.tracking import check_reachable, default_tracking_uri

# metrics shown when --metrics is not given, in this order, when the runs have them
DEFAULT_METRICS = (
    "eval/gold_reward", "eval/proxy_reward", "eval/kl", "objective/scores", "objective/kl", "objective/entropy",
    "episodes_per_s", "bon/gold", "bon/proxy", "val/loss", "val/accuracy", "val/gold_accuracy", "eval/exact_match",
    "eval/gold", "val/perplexity",
)
LOWER_IS_BETTER = re.compile(r"(loss|perplexity|error|kl|mistakes|calibration|^time/)")
NOT_COMPARED = ("compare",)  # runs of these stages are never rows of a comparison


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rlhf compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///$RLHF_HOME/mlflow.db, RLHF_HOME=outputs)")
    p.add_argument("--experiment", default="rlhf-lab", help="experiment name (default: rlhf-lab)")
    p.add_argument("--runs", help="comma-separated run ids (then --experiment and the filters are not used)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="runs with this tag (repeatable)")
    p.add_argument("--stage", help="runs of this stage (tag stage=...): pretrain, sft, reward_model, rl, eval, pipeline")
    p.add_argument("--filter", default="", help="an MLflow search filter string, ANDed with the above")
    p.add_argument("--max-runs", type=int, default=20, help="newest N matching runs (default 20)")
    p.add_argument("--params", help="comma-separated params to show (default: plugins and the params that differ)")
    p.add_argument("--metrics", help=f"comma-separated metrics (default: those of {', '.join(DEFAULT_METRICS[:4])}, ...)")
    p.add_argument("--out", help="folder for the PNGs and table (default: ./compare-<time>)")
    p.add_argument("--no-log", action="store_true", help="do not log the plots to a new MLflow run")
    return p.parse_args(list(argv))


def tracking_uri(args: argparse.Namespace) -> str:
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        root = Path(os.environ.get("RLHF_HOME", "outputs")).expanduser()
        uri = default_tracking_uri(root)
        if not (root / "mlflow.db").is_file():
            raise ConfigError(f"no local MLflow store at {root / 'mlflow.db'}: set RLHF_HOME to the folder your runs "
                              "wrote to, or give --tracking-uri")
    check_reachable(uri)
    return uri


def find_runs(client, args: argparse.Namespace) -> list:
    if args.runs:
        runs = []
        for run_id in [r.strip() for r in args.runs.split(",") if r.strip()]:
            try:
                runs.append(client.get_run(run_id))
            except Exception as err:
                raise ConfigError(f"--runs: no run {run_id!r} in the store ({type(err).__name__})") from None
        return runs
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(f"no MLflow experiment {args.experiment!r} (there are: {', '.join(names) or 'none'})")
    clauses = [args.filter] if args.filter else []
    for tag in args.tag:
        key, sep, value = tag.partition("=")
        if not sep:
            raise ConfigError(f"--tag {tag!r}: write KEY=VALUE")
        clauses.append(f"tags.`{key}` = '{value}'")
    if args.stage:
        clauses.append(f"tags.stage = '{args.stage}'")
    try:
        runs = client.search_runs([exp.experiment_id], filter_string=" and ".join(clauses),
                                  order_by=["attributes.start_time DESC"], max_results=args.max_runs)
    except Exception as err:
        raise ConfigError(f"the MLflow search failed: {err}") from None
    return [r for r in runs if r.data.tags.get("stage") not in NOT_COMPARED]


def best(metric: str, values: list[float]) -> float:
    return min(values) if LOWER_IS_BETTER.search(metric) else max(values)


def choose_params(runs: list, wanted: str | None) -> list[str]:
    if wanted:
        return [p.strip() for p in wanted.split(",") if p.strip()]
    shared = sorted(set.intersection(*(set(r.data.params) for r in runs)))
    differ = [k for k in shared if len({r.data.params[k] for r in runs}) > 1 and not k.startswith(("paths.", "logger."))]
    return differ[:12]


def choose_metrics(runs: list, wanted: str | None) -> list[str]:
    if wanted:
        return [m.strip() for m in wanted.split(",") if m.strip()]
    present = {k for r in runs for k in r.data.metrics}
    return [m for m in DEFAULT_METRICS if m in present][:8]


def label(run) -> str:
    return f"{run.data.tags.get('mlflow.runName', '')} {run.info.run_id[:6]}".strip()


def short(value: object, width: int = 22) -> str:
    text = value if isinstance(value, str) else (f"{value:.4g}" if isinstance(value, float) else str(value))
    text = text.rsplit(".", 1)[-1] if isinstance(value, str) and text.count(".") > 1 and "/" not in text else text
    return text if len(text) <= width else text[: width - 1] + "…"


def table(runs: list, params: list[str], metrics: list[str], histories: dict) -> list[str]:
    rows = [("run", [r.data.tags.get("mlflow.runName", "-") for r in runs]), ("run id", [r.info.run_id[:8] for r in runs]),
            ("stage", [r.data.tags.get("stage", "") for r in runs])]
    plugins = sorted({k for r in runs for k in r.data.tags if k.startswith("plugin.")})
    rows += [(k, [r.data.tags.get(k, "-") for r in runs]) for k in plugins
             if len({r.data.tags.get(k) for r in runs}) > 1 or k in ("plugin.algo", "plugin.reward")]
    rows += [(p, [r.data.params.get(p, "-") for r in runs]) for p in params]
    for m in metrics:
        finals, bests = [], []
        for r in runs:
            hist = histories.get((r.info.run_id, m)) or []
            finals.append(hist[-1][1] if hist else "-")
            bests.append(best(m, [v for _, v in hist]) if hist else "-")
        rows += [(f"{m} (final)", finals), (f"{m} (best)", bests)]
    key_w = max(len(k) for k, _ in rows)
    col_w = [max(len(short(vals[i])) for _, vals in rows) for i in range(len(runs))]
    return [f"{k:<{key_w}}  " + "  ".join(f"{short(v):>{w}}" for v, w in zip(vals, col_w)) for k, vals in rows]


def safe_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric)


def plot_metrics(runs: list, metrics: list[str], histories: dict, out: Path) -> list[Path]:
    paths = []
    for m in metrics:
        lines = [(label(r), histories.get((r.info.run_id, m)) or []) for r in runs]
        if not any(len(h) for _, h in lines):
            continue
        plt, fig, axes = plot_figure()
        for name, hist in lines:
            if hist:
                axes[0].plot([s for s, _ in hist], [v for _, v in hist], marker="o" if len(hist) < 30 else None,
                             markersize=3, label=name)
        axes[0].set_xlabel("step")
        axes[0].set_ylabel(m)
        axes[0].set_title(m)
        path = out / f"{safe_name(m)}.png"
        save_plot(plt, fig, axes, path)
        paths.append(path)
    return paths


def plot_gold_vs_kl(runs: list, histories: dict, out: Path) -> Path | None:
    """Gold reward against d = sqrt(KL) for runs that log both at evaluation (the over-optimisation axes)."""
    curves = []
    for r in runs:
        gold = dict(histories.get((r.info.run_id, "eval/gold_reward")) or [])
        kl = dict(histories.get((r.info.run_id, "eval/kl")) or [])
        steps = sorted(set(gold) & set(kl))
        if steps:
            curves.append((label(r), [math.sqrt(max(kl[s], 0.0)) for s in steps], [gold[s] for s in steps]))
    if not curves:
        return None
    plt, fig, axes = plot_figure()
    for name, xs, ys in curves:
        axes[0].plot(xs, ys, marker="o", markersize=3, label=name)
    axes[0].set_xlabel("d = sqrt(KL to the reference)")
    axes[0].set_ylabel("gold reward")
    axes[0].set_title("gold reward vs sqrt(KL)")
    path = out / "gold_vs_sqrt_kl.png"
    save_plot(plt, fig, axes, path)
    return path


def compare(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    from mlflow import MlflowClient

    uri = tracking_uri(args)
    client = MlflowClient(tracking_uri=uri)
    runs = find_runs(client, args)
    if not runs:
        raise ConfigError(f"no runs match in {uri} (experiment {args.experiment!r}"
                          + "".join(f", tag {t}" for t in args.tag) + (f", stage {args.stage}" if args.stage else "")
                          + (f", filter {args.filter!r}" if args.filter else "") + ")")
    params, metrics = choose_params(runs, args.params), choose_metrics(runs, args.metrics)
    histories = {}
    for r in runs:
        for m in set(metrics) | {"eval/gold_reward", "eval/kl"}:
            if m in r.data.metrics:
                hist = client.get_metric_history(r.info.run_id, m)
                histories[(r.info.run_id, m)] = sorted((h.step, h.value) for h in hist)
    lines = table(runs, params, metrics, histories)
    print(f"[rlhf] compare: {len(runs)} run(s) from {uri}\n" + "\n".join(lines))

    out = Path(args.out or f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text("\n".join(lines) + "\n")
    pngs = plot_metrics(runs, metrics, histories, out)
    gold_kl = plot_gold_vs_kl(runs, histories, out)
    pngs += [gold_kl] if gold_kl else []
    print(f"[rlhf] compare: wrote {len(pngs)} plot(s) and table.txt to {out}")
    if not args.no_log:
        exp_id = runs[0].info.experiment_id
        run = client.create_run(exp_id, run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
                                tags={"stage": "compare", "compared_runs": ",".join(r.info.run_id for r in runs)})
        for path in [*pngs, out / "table.txt"]:
            client.log_artifact(run.info.run_id, str(path))
        client.set_terminated(run.info.run_id)
        print(f"[rlhf] compare: logged to MLflow run {run.info.run_id} (open with: mlflow ui --backend-store-uri {uri})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return compare(sys.argv[1:] if argv is None else argv)
    except (RLHFError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
