"""MLflow tracking: where runs go, checking the server before training, and one `TrackedRun` per stage.

Default store: `sqlite:///<paths.root>/mlflow.db` (MLflow's own default backend, a real database, no server),
artifacts under `<paths.root>/mlartifacts`. `MLFLOW_TRACKING_URI` or `logger.tracking_uri=http://host:port` send
the same run to a real `mlflow server`. Uses `MlflowClient` with explicit run ids, never mlflow's global active run.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import http.client
import json
import os
import subprocess
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from omegaconf import DictConfig, OmegaConf

from framework.errors import ConfigError, TrackingError

if TYPE_CHECKING:
    from mlflow import MlflowClient

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
RUN_FILE = "mlflow_run.json"  # written in each run's output dir; `resume` reads it to continue the same run


def default_tracking_uri(root: str | Path) -> str:
    return f"sqlite:///{Path(root).expanduser().resolve() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None, root: str | Path) -> str:
    """The configured URI (logger.tracking_uri, which defaults to $MLFLOW_TRACKING_URI), else the local default."""
    if configured:
        return str(configured)
    return default_tracking_uri(root)


# the URI schemes of the stores MLflow can use: a server, a database (sqlite is the local default), Databricks; and
# those MLflow plugins register (`store_schemes`)
SERVER_SCHEMES = ("http", "https")
STORE_SCHEMES = (*SERVER_SCHEMES, "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")


def store_schemes() -> tuple[str, ...]:
    """STORE_SCHEMES and the schemes of the tracking stores installed MLflow plugins register (`azureml`, ...)."""
    from importlib.metadata import entry_points

    return (*STORE_SCHEMES, *(e.name for e in entry_points(group="mlflow.tracking_store")))


def uri_forms(root: str | Path | None = None) -> str:
    """The tracking URIs we accept, for an error message; with `root`, the local default spelt out."""
    local = default_tracking_uri(root) if root is not None else "sqlite:///<paths.root>/mlflow.db"
    return (f"give http(s)://host:port of a running `mlflow server`, or logger.tracking_uri=null for the local store "
            f"{local} (the default)")


def _uri_name(uri: str) -> str:
    """How the user gave `uri`: logger.tracking_uri defaults to $MLFLOW_TRACKING_URI."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI") == uri
    return f"logger.tracking_uri={uri!r}" + (" (from $MLFLOW_TRACKING_URI)" if from_env else "")


def check_tracking_uri(uri: str, root: str | Path | None = None, name: str | None = None,
                       forms: str | None = None) -> str:
    """Raise a ConfigError, before anything is trained, when `uri` is not a store MLflow can use: a typo in the
    scheme (`htp://`), a bad port (`http://host:abc`), or a plain path / file: URI (MLflow's retired file store,
    which it refuses unless MLFLOW_ALLOW_FILE_STORE=true). root: paths.root, to spell out the local default; name:
    how the URI was given (default `logger.tracking_uri=...`); forms: the URIs that work, for the message (default
    the training command's). Returns `uri` with its scheme in lower case."""
    from urllib.parse import urlsplit

    if uri in ("databricks", "databricks-uc", "uc"):  # a bare "databricks": the default Databricks profile
        return uri
    name, forms = name or _uri_name(uri), forms or uri_forms(root)
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0..65535
    except ValueError as err:
        raise ConfigError(f"{name} is not a valid URL ({err}): {forms}") from None
    scheme = parts.scheme.lower()
    if len(scheme) <= 1 or scheme == "file":  # a path (a one-letter scheme is a Windows drive: C:\\...)
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true"):
            return uri
        folder = Path(parts.path if scheme == "file" else uri).expanduser()
        raise ConfigError(f"{name} is a folder for MLflow's retired file store, which MLflow refuses: {forms}, or "
                          f"sqlite:///{folder.resolve() / 'mlflow.db'} for a database in that folder")
    known = store_schemes()
    if scheme.split("+")[0] not in known:  # postgresql+psycopg2://... names a driver
        close = difflib.get_close_matches(scheme, known, n=1)
        guess = f" (did you mean {close[0]}://?)" if close else ""
        raise ConfigError(f"{name} has an unknown scheme {scheme + ':'!r}{guess}: {forms}")
    if scheme in SERVER_SCHEMES and not parts.hostname:
        raise ConfigError(f"{name} names no host: {forms}")
    return scheme + uri[len(scheme):]  # HTTP://host is a server too


def check_reachable(uri: str, timeout_s: float = 5.0, fix: str | None = None) -> None:
    """Fail fast, before any training, when an http(s) tracking server does not answer. fix: what to do then, for
    the message (default: the training command's)."""
    if not uri.startswith(("http://", "https://")):
        return
    probe = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(probe, timeout=timeout_s) as resp:
            resp.read(1)
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return  # reachable; auth is mlflow's business (MLFLOW_TRACKING_USERNAME/TOKEN)
        raise TrackingError(f"MLflow server at {uri} answered HTTP {err.code} to {probe}; is it an MLflow server?") from None
    except (http.client.InvalidURL, ValueError) as err:  # a URL urllib cannot send: `http://host:abc`, a space
        raise ConfigError(f"{_uri_name(uri)} is not a valid URL ({err}): {uri_forms()}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(f"cannot reach the MLflow tracking server at {uri} ({reason}). " + (fix or (
            "Nothing was trained. Start it (`mlflow server --host 127.0.0.1 --port <port>`), fix logger.tracking_uri / "
            "MLFLOW_TRACKING_URI, or add logger.fallback_to_local=true to log to the local store instead"))) from None


def _server_gone(err: BaseException) -> bool:
    """Whether `err` is MLflow's REST client saying that a request got no answer (refused, reset, timed out, its
    retries used up), as opposed to an answer from the server (a bad parameter, a missing run)."""
    from mlflow.exceptions import MlflowException

    text = str(err)  # "failed with error code 401 != 200" is an answer (e.g. an auth proxy's page): not gone
    return isinstance(err, MlflowException) and text.startswith("API request to ") and (
        " failed with exception " in text or " failed with timeout exception " in text)


def _root_cause(err: BaseException) -> BaseException:
    seen = {id(err)}
    while (nxt := err.__cause__ or err.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        err = nxt
    return err


class _GuardedClient:
    """An `MlflowClient` whose calls raise `run`'s TrackingError when the server stops answering (see
    `TrackedRun.server_errors`); everything else, answers and other errors, passes through unchanged."""

    def __init__(self, client: "MlflowClient", run: "TrackedRun"):
        self._client = client
        self._run = run

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # `_client` itself before __init__ set it (copy, unpickling), and private names
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            with self._run.server_errors():
                return attr(*args, **kwargs)

        return guarded


def _short(value: str, width: int = 60) -> str:
    return value if len(value) <= width else value[: width - 3] + "..."


def flatten_config(cfg: Mapping[str, Any] | DictConfig, prefix: str = "") -> dict[str, str]:
    """{"model.n_layer": "4", ...} from a nested config; lists become their JSON text."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, name + "."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = text[:MAX_PARAM_CHARS]
    return flat


def plugin_targets(cfg: DictConfig) -> dict[str, str]:
    """{"plugin.dataset": "plugins.datasets.chitchat.ChitchatCorpus", ...} for every `_target_` in the config."""
    flat = flatten_config(cfg)
    return {f"plugin.{k[: -len('._target_')]}": v for k, v in flat.items() if k.endswith("._target_")}


def git_commit(start: Path | None = None) -> str | None:
    """The commit of the checkout the framework runs from (None outside a git checkout)."""
    here = start or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def is_rank_zero() -> bool:
    """True in the process of global rank 0 (torchrun/Lightning RANK, SLURM_PROCID, or LOCAL_RANK + NODE_RANK)."""
    for key in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return os.environ[key] == "0"
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


class TrackedRun:
    """One MLflow run, addressed by id. Every write goes through the client for this run only.

    """

    def __init__(self, client: "MlflowClient", run_id: str, tracking_uri: str, experiment_id: str,
                 in_pipeline: bool = False):
        self.client = _GuardedClient(client, self) if tracking_uri.startswith(("http://", "https://")) else client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.in_pipeline = in_pipeline  # a stage of `pipeline=...`: the pipeline prints how to continue
        self.output_dir: Path | None = None  # the run's folder (checkpoints/), known once save_pointer wrote there
        self._server_gone_said = False

    @contextlib.contextmanager
    def server_errors(self):
        """Turn MLflow's traceback for a server that stopped answering during the run into one TrackingError that
        says so, where the checkpoints are kept, and how to continue."""
        try:
            yield
        except Exception as err:
            if not _server_gone(err):
                raise
            reason = str(_root_cause(err))[:300]
            if self._server_gone_said:  # said in full once (e.g. by the failing metric), then briefly
                raise TrackingError(f"the MLflow tracking server at {self.tracking_uri} is not answering "
                                    f"({reason})") from err
            self._server_gone_said = True
            kept = (f"the checkpoints are kept under {self.output_dir / 'checkpoints'}" if self.output_dir
                    else "what the run wrote so far is kept")
            if self.in_pipeline:
                how = ("start the server again and run the `pipeline.start_at=...` command printed above, or run it "
                       "with logger.fallback_to_local=true to log to the local store instead")
            else:
                how = ("start the server again and continue with `resume=true` (the same MLflow run goes on), or "
                       "continue without the server with `resume=true logger.fallback_to_local=true` (the rest is "
                       "logged as a new run in the local store)")
            raise TrackingError(f"the MLflow tracking server at {self.tracking_uri} stopped answering during the "
                                f"run ({reason}); {kept}: {how}") from err

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log params; on a resumed run, keys already logged keep their first value and changes become tags."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = {k: v for k, v in params.items() if k not in existing}
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        for k, v in changed.items():
            self.client.set_tag(self.run_id, f"resume.changed.{k}", v[:MAX_PARAM_CHARS])
        if changed:  # said, not only tagged: a resumed run that reads other data should not pass unnoticed
            print("[rlhf] resumed run: settings that differ from its first attempt (tagged resume.changed.*): "
                  + "; ".join(f"{k} {_short(existing[k])} -> {_short(v)}" for k, v in sorted(changed.items())))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            if v is not None:
                self.client.set_tag(self.run_id, k, str(v))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, data: Mapping[str, list], artifact_file: str) -> None:
        """An MLflow table, written once per file: MLflow appends the rows to a table file that exists, so a step
        logged again after a resume (the same seeded samples) would hold them twice. The first one stays."""
        folder = artifact_file.rpartition("/")[0] or None
        if any(a.path == artifact_file for a in self.client.list_artifacts(self.run_id, folder)):
            return
        self.client.log_table(self.run_id, data=dict(data), artifact_file=artifact_file)

    def log_dir(self, path: Path, artifact_path: str, max_mb: float) -> bool:
        """Log a directory as artifacts if it is at most `max_mb`; always record its path as a tag."""
        self.set_tags({f"artifact.{artifact_path}": str(path.resolve())})
        if dir_size_mb(path) > max_mb:
            return False
        self.client.log_artifacts(self.run_id, str(path), artifact_path)
        return True

    def lightning_logger(self):
        """A Lightning `MLFlowLogger` that writes into this run but leaves its status to us: Lightning would mark
        the run FINISHED at the end of every validate()/fit(), also before training has started."""
        from pytorch_lightning.loggers import MLFlowLogger

        run = self

        class RunLogger(MLFlowLogger):
            def finalize(self, status: str = "success") -> None:
                pass

            def log_hyperparams(self, params: Any) -> None:
                with run.server_errors():
                    super().log_hyperparams(params)

            def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
                with run.server_errors():
                    super().log_metrics(metrics, step)

        return RunLogger(tracking_uri=self.tracking_uri, run_id=self.run_id, log_model=False)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def save_pointer(self, output_dir: Path) -> None:
        """Write `mlflow_run.json` in the run's output dir so a resumed run can continue this MLflow run."""
        self.output_dir = output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_FILE).write_text(
            json.dumps({"tracking_uri": self.tracking_uri, "run_id": self.run_id, "experiment_id": self.experiment_id})
        )


class FollowerRun(TrackedRun):
    """Ranks other than 0: knows rank 0's run id (for Lightning's logger, which logs on rank 0 only); writes nothing."""

    def _skip(self, *args: Any, **kwargs: Any) -> None:
        return None

    log_params = set_tags = log_text = log_table = log_dir = end = save_pointer = _skip


def read_pointer(run_dir: Path) -> dict | None:
    """The {tracking_uri, run_id, experiment_id} a run wrote in its output dir, or None."""
    pointer = run_dir / RUN_FILE
    return json.loads(pointer.read_text()) if pointer.exists() else None


def follow_run(output_dir: Path) -> TrackedRun:
    """For ranks other than 0: the run rank 0 opened, read from the pointer it wrote in the shared output dir."""
    from mlflow import MlflowClient

    info = read_pointer(output_dir)
    if info is None:
        raise TrackingError(f"no {RUN_FILE} in {output_dir}; rank 0 writes it before starting the other ranks")
    client = MlflowClient(tracking_uri=info["tracking_uri"])
    return FollowerRun(client, info["run_id"], info["tracking_uri"], info["experiment_id"])


def _get_or_create_experiment(client: "MlflowClient", name: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = f"{artifact_root}/{name}" if artifact_root else None
    return client.create_experiment(name, artifact_location=location)


def open_run(
    logger_cfg: DictConfig,
    root: str | Path,
    run_name: str,
    tags: Mapping[str, Any],
    resume_run_id: str | None = None,
    resume_store: str | None = None,
) -> TrackedRun:
    """Resolve and check the store, then start (or reopen, on resume) the run for one stage. resume_store: the store
    that holds `resume_run_id` (the checkpoint's mlflow_run.json); in another store the resumed run goes on as a new
    run there, tagged `resumed_from_run_id`."""
    uri = check_tracking_uri(resolve_tracking_uri(logger_cfg.get("tracking_uri"), root), root)
    try:
        check_reachable(uri, float(logger_cfg.get("connect_timeout_s", 5)))
    except TrackingError as err:
        if not logger_cfg.get("fallback_to_local", False):
            raise
        uri = default_tracking_uri(root)
        warnings.warn(f"{err}\nfalling back to the local store {uri} (logger.fallback_to_local=true)", stacklevel=2)
    if resume_run_id and resume_store and resume_store != uri:
        # e.g. the server's run continued locally while the server was down, or a local run resumed with the server
        warnings.warn(f"MLflow run {resume_run_id} is in {resume_store}, not in {uri}: the resumed run is logged there "
                      "as a new run, tagged resumed_from_run_id", stacklevel=2)
        tags = {**tags, "resumed_from_run_id": resume_run_id}
        resume_run_id = None

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes, if it goes away
    from mlflow import MlflowClient

    artifact_root = None
    if not uri.startswith(("http://", "https://", "databricks")):
        artifact_root = (Path(root).expanduser().resolve() / "mlartifacts").as_uri()
    in_pipeline = "pipeline" in tags
    try:
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)  # opens (and creates or migrates) a database store
        if resume_run_id:
            run = client.get_run(resume_run_id)
            client.update_run(resume_run_id, status="RUNNING")
            return TrackedRun(client, resume_run_id, uri, run.info.experiment_id, in_pipeline)
        exp_id = _get_or_create_experiment(client, str(logger_cfg.get("experiment_name") or "rlhf-lab"), artifact_root)
        run = client.create_run(exp_id, run_name=run_name, tags={k: str(v) for k, v in tags.items() if v is not None})
    except Exception as err:  # mlflow raises MlflowException, OSError, sqlalchemy errors...
        raise TrackingError(f"cannot write to the MLflow store {uri}: {err}") from err
    return TrackedRun(client, run.info.run_id, uri, exp_id, in_pipeline)
