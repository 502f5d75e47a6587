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
import difflib
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from framework.errors import ConfigError, RLHFError, TrackingError
from framework.plots import plot_figure, save_plot
from framework.tracking import check_reachable, check_tracking_uri, default_tracking_uri

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


def local_root() -> Path:
    return Path(os.environ.get("RLHF_HOME", "outputs")).expanduser()


def tracking_uri(args: argparse.Namespace) -> str:
    if args.tracking_uri:
        uri, source = args.tracking_uri, "--tracking-uri"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri, source = os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    else:
        root = local_root()
        if not (root / "mlflow.db").is_file():
            raise ConfigError(f"no local MLflow store at {root / 'mlflow.db'}: set RLHF_HOME to the folder your runs "
                              "wrote to, or give --tracking-uri")
        return default_tracking_uri(root)
    uri = check_uri_form(uri, source)
    check_server(uri, source)
    return uri


def check_uri_form(uri: str, source: str) -> str:
    """Refuse, before MLflow sees them, the stores it would refuse with a traceback (a folder: MLflow's file store;
    a misspelt scheme, a bad port: `check_tracking_uri`) or silently create empty (a SQLite file that does not
    exist): there would be nothing to compare. Returns the URI with its scheme in lower case (`HTTP://...` is a
    server too)."""
    example = default_tracking_uri(local_root())
    forms = f"give the SQLite store your runs wrote to (sqlite:///<absolute path>/mlflow.db, e.g. {example}) or " \
            "an MLflow server (http://host:port)"
    uri = check_tracking_uri(uri, name=f"{source} {uri}", forms=forms)
    scheme = urlsplit(uri).scheme
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise ConfigError(f"{source} {uri}: an SQLite store is sqlite:///<path> (three slashes, then the path: "
                              f"four for an absolute one); {forms}")
        db = uri[len("sqlite:///"):].split("?", 1)[0]
        if db in ("", ":memory:"):
            raise ConfigError(f"{source} {uri}: an in-memory SQLite store holds no runs to compare; {forms}")
        path = Path(db)
        if not path.is_file():
            hint = ""
            if not path.is_absolute() and Path("/" + db).is_file():
                hint = f" (did you mean sqlite:////{db}? an absolute path takes four slashes)"
            raise ConfigError(f"{source} {uri}: no SQLite store at {path.resolve()}, so nothing to compare (MLflow "
                              f"would create an empty one); {forms}{hint}")
    return uri


def check_server(uri: str, source: str) -> None:
    """For an http(s) store: fail fast, with the fix for this command, when the server does not answer."""
    local = f"leave out {source}" if source == "--tracking-uri" else f"unset {source}"
    check_reachable(uri, fix=f"Start it (`mlflow server --backend-store-uri {default_tracking_uri(local_root())} "
                             f"--port <port>`) and give its address with --tracking-uri http://127.0.0.1:<port>, or "
                             f"{local} to read the local store {local_root() / 'mlflow.db'} directly")


def open_store(uri: str):
    from mlflow import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as err:  # MlflowException (unsupported scheme), sqlalchemy errors (not a database)...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot open the MLflow store {uri}: {first}; give --tracking-uri as "
                          "sqlite:///<absolute path>/mlflow.db or http://host:port") from None


def check_out(out: Path) -> None:
    """Refuse an --out that cannot become a folder, before the store is read and anything is printed or written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file of that name exists (it is kept); give a folder for the table and "
                          "plots (a new one, or one without a table.txt)")
    parent = out.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a folder; give a folder for the table and plots")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot write in {parent} (permission denied); give a folder you can write to")
    if (out / "table.txt").exists():  # an earlier comparison: its table and plots would be overwritten
        raise ConfigError(f"--out {out} already holds a comparison (table.txt), which this one would overwrite; give "
                          "a new folder (or leave --out out for a dated one)")


def quoted(value: str, what: str) -> str:
    """`value` as an MLflow filter string literal: MLflow has no escapes, so quote with the mark it does not hold."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"{what}: MLflow's filter strings cannot match a value holding both ' and \"; select the runs "
                      "with --runs <id>,<id> instead")


def check_present(kind: str, wanted: list[str], present: set[str]) -> None:
    """Refuse names that none of the selected runs has (a misspelt --metrics/--params would show only "-")."""
    missing = [name for name in wanted if name not in present]
    if not missing:
        return
    names = []
    for name in missing:
        close = difflib.get_close_matches(name, sorted(present), n=1)
        names.append(repr(name) + (f" (did you mean {close[0]!r}?)" if close else ""))
    have = sorted(present)
    listing = ", ".join(have[:15]) + (f", ... ({len(have)} in all)" if len(have) > 15 else "")
    kind_word = "metrics" if kind == "--metrics" else "params"
    raise ConfigError(f"{kind}: {', '.join(names)} {'is' if len(missing) == 1 else 'are'} in none of the selected "
                      f"runs; " + (f"their {kind_word}: {listing}" if have else f"they logged no {kind_word}"))


def find_runs(client, args: argparse.Namespace) -> list:
    if args.runs:
        runs = []
        for run_id in [r.strip() for r in args.runs.split(",") if r.strip()]:
            try:
                runs.append(client.get_run(run_id))
            except Exception as err:
                raise ConfigError(f"--runs: no run {run_id!r} in the store ({type(err).__name__})") from None
        return runs
    try:
        exp = client.get_experiment_by_name(args.experiment)
        names = [e.name for e in client.search_experiments()] if exp is None else []
    except Exception as err:
        raise TrackingError(f"cannot read the MLflow store: {err}") from None
    if exp is None:
        raise ConfigError(f"no MLflow experiment {args.experiment!r} (there are: {', '.join(names) or 'none'})")
    clauses = [args.filter] if args.filter else []
    for tag in args.tag:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise ConfigError(f"--tag {tag!r}: write KEY=VALUE")
        if "`" in key:
            raise ConfigError(f"--tag {tag!r}: a tag name cannot hold a backquote (`) in an MLflow filter; select "
                              "the runs with --runs <id>,<id> instead")
        clauses.append(f"tags.`{key}` = {quoted(value, f'--tag {tag!r}')}")
    if args.stage:
        clauses.append(f"tags.stage = {quoted(args.stage, f'--stage {args.stage!r}')}")
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
    out = Path(args.out or f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    check_out(out)
    uri = tracking_uri(args)
    client = open_store(uri)
    runs = find_runs(client, args)
    if not runs:
        raise ConfigError(f"no runs match in {uri} (experiment {args.experiment!r}"
                          + "".join(f", tag {t}" for t in args.tag) + (f", stage {args.stage}" if args.stage else "")
                          + (f", filter {args.filter!r}" if args.filter else "") + ")")
    params, metrics = choose_params(runs, args.params), choose_metrics(runs, args.metrics)
    if args.metrics:
        check_present("--metrics", metrics, {k for r in runs for k in r.data.metrics})
    if args.params:
        check_present("--params", params, {k for r in runs for k in r.data.params})
    histories = {}
    for r in runs:
        for m in set(metrics) | {"eval/gold_reward", "eval/kl"}:
            if m in r.data.metrics:
                hist = client.get_metric_history(r.info.run_id, m)
                histories[(r.info.run_id, m)] = sorted((h.step, h.value) for h in hist)
    lines = table(runs, params, metrics, histories)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot create that folder ({err.strerror or err}); give a folder you can "
                          "write to") from None
    print(f"[rlhf] compare: {len(runs)} run(s) from {uri}\n" + "\n".join(lines))
    try:
        (out / "table.txt").write_text("\n".join(lines) + "\n")
        pngs = plot_metrics(runs, metrics, histories, out)
        gold_kl = plot_gold_vs_kl(runs, histories, out)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write there ({err.strerror or err}); give a folder you can write "
                          "to") from None
    pngs += [gold_kl] if gold_kl else []
    print(f"[rlhf] compare: wrote {len(pngs)} plot(s) and table.txt to {out}")
    if not args.no_log:
        run = None
        try:
            exp_id = runs[0].info.experiment_id
            run = client.create_run(exp_id, run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
                                    tags={"stage": "compare", "compared_runs": ",".join(r.info.run_id for r in runs)})
            for path in [*pngs, out / "table.txt"]:
                client.log_artifact(run.info.run_id, str(path))
            client.set_terminated(run.info.run_id)
        except Exception as err:  # a read-only store or artifact folder: the files in --out stay
            if run is not None:
                try:
                    client.set_terminated(run.info.run_id, "FAILED")
                except Exception:
                    pass
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrackingError(f"the table and plots are in {out}, but logging them to {uri} failed ({first}); "
                                "fix the store's permissions, or add --no-log") from None
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
