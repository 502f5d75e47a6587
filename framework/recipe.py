"""The whole recipe in one command (`rlhf pipeline=chatgpt`): the stages in order, each composed by Hydra as if run
alone (`rlhf stage=<name> <your overrides>`), each reading the artifacts of the ones before it, as nested MLflow runs
under one parent run that records what every stage produced and consumed.

A stage's config = `stage=<name>` + the pipeline's settings for that stage (`pipeline.stage_overrides.<name>`) + your
command line (which wins, and applies to every stage) + the wiring (`pipeline.wiring.<name>`: which config key gets
which earlier stage's artifact). `pipeline.start_at` skips the stages before it; their artifacts come from
`pipeline.inputs.<stage>` (a directory, or `runs:/<run id>[/<artifact path>]` from the MLflow store).
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from framework.distributed import data_parallel_processes
from framework.errors import ConfigError, TrackingError
from framework.tracking import MAX_PARAM_CHARS, git_commit, open_run, resolve_tracking_uri

# what a stage logs its exported artifact under (runs:/<id> without a path looks for these)
ARTIFACT_PATHS = ("model", "reward_model")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_pipeline_override(override: str) -> bool:
    key = _key(override)
    return key == "pipeline" or key.startswith("pipeline.")


def merge_overrides(*groups: list[str]) -> list[str]:
    """Overrides in order with later ones replacing earlier ones of the same key (Hydra refuses some duplicates)."""
    merged: dict[str, str] = {}
    for group in groups:
        for o in group:
            merged.pop(_key(o), None)
            merged[_key(o)] = o
    return list(merged.values())


def _quote(value: str) -> str:
    """A path as a Hydra override value (quoted when it has characters the override grammar reads)."""
    return value if all(c.isalnum() or c in "/._-:" for c in value) else "'" + value.replace("'", "\\'") + "'"


def resolve_input(spec: str, stage: str, cfg: DictConfig, dest: Path) -> Path:
    """An artifact given to the pipeline: a local directory, or runs:/<run id>[/<artifact path>] in the MLflow store
    (the run's own export when it is still on this disk, else downloaded under `dest`)."""
    spec = str(spec)
    if not spec.startswith("runs:/"):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ConfigError(f"pipeline.inputs.{stage}={spec}: no such directory (give the dir a `{stage}` run "
                              "exported, or runs:/<run id>)")
        return path
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    run_id, _, artifact_path = spec[len("runs:/"):].strip("/").partition("/")
    uri = resolve_tracking_uri(cfg.logger.get("tracking_uri"), Path(cfg.paths.root).expanduser())
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise ConfigError(f"pipeline.inputs.{stage}={spec}: no run {run_id!r} in the MLflow store {uri} ({err})") from None
    if not artifact_path:
        local = run.data.tags.get("artifact_dir")
        if local and Path(local).is_dir():
            return Path(local)
        logged = {a.path for a in client.list_artifacts(run_id)}
        artifact_path = next((p for p in ARTIFACT_PATHS if p in logged), "")
        if not artifact_path:
            raise ConfigError(f"pipeline.inputs.{stage}={spec}: the run's export is neither on this disk nor logged "
                              f"as an artifact ({sorted(logged) or 'none'}); give runs:/{run_id}/<artifact path>")
    dest.mkdir(parents=True, exist_ok=True)
    return Path(download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dest), tracking_uri=uri))


def _is_stage_setting(override: str) -> bool:
    """A `stage.<key>=value` override that sets a key (plain, or Hydra's add-or-set `++`; not `+`/`~`): it reaches
    only the stages that have that key."""
    return (override.startswith("++") or override[:1] not in "+~") and _key(override).startswith("stage.")


def stage_settings(name: str, user: list[str], pipe: DictConfig) -> set[str]:
    """The user's `stage.<key>=...` overrides that stage `name` has (its composed config holds the key). The stage is
    composed with the user's `hydra.searchpath`, where its config groups (and the pipeline's) may live."""
    from hydra import compose
    from omegaconf import OmegaConf

    wanted = [o for o in user if _is_stage_setting(o)]
    if not wanted:
        return set()
    searchpath = [o for o in user if _key(o) == "hydra.searchpath"]
    probe = compose(config_name="config", overrides=merge_overrides([f"stage={name}"],
                                                                    list(pipe.stage_overrides.get(name) or []),
                                                                    searchpath))
    absent = object()
    return {o for o in wanted if OmegaConf.select(probe, _key(o), default=absent) is not absent}


def stage_config(name: str, user: list[str], pipe: DictConfig, artifacts: dict[str, Path], out: Path,
                 has: set[str] | None = None) -> tuple[DictConfig, dict[str, str]]:
    """The composed config of one stage, and what it consumes (config key -> artifact dir). A `stage.<key>=...` on
    the command line reaches the stages that have that key (stage.iterations: RL's), like `trainer.max_steps`;
    `has` is `stage_settings(name, user, pipe)` when the caller already has it."""
    from hydra import compose

    has = stage_settings(name, user, pipe) if has is None else has
    user = [o.removeprefix("++") if o in has else o for o in user if not _is_stage_setting(o) or o in has]
    consumed = {}
    for wire in pipe.wiring.get(name) or []:
        key, _, source = str(wire).partition("=")
        if source not in artifacts:
            raise ConfigError(f"pipeline stage {name!r} reads the artifact of stage {source!r} ({key}), which this "
                              f"run neither made nor was given: add pipeline.inputs.{source}=<dir or runs:/<run id>>")
        consumed[key] = str(artifacts[source])
    overrides = merge_overrides([f"stage={name}"], list(pipe.stage_overrides.get(name) or []), user,
                                [f"{k}={_quote(v)}" for k, v in consumed.items()],
                                [f"paths.output_dir={_quote(str(out))}"])
    return compose(config_name="config", overrides=overrides), consumed


def resume_command(failed: str, artifacts: dict[str, Path], command_line: list[str]) -> str:
    """The command that continues at `failed` with the artifacts made so far and the rest of the command line."""
    keep = [o for o in command_line if _key(o) != "pipeline.start_at" and not _key(o).startswith("pipeline.inputs.")]
    args = [*keep, f"pipeline.start_at={failed}", *(f"pipeline.inputs.{s}={p}" for s, p in artifacts.items())]
    return "rlhf " + " ".join(shlex.quote(a) for a in args)


def refuse_data_parallel_pipeline(trainer, pipeline: str, stage: str | None = None) -> None:
    """A pipeline runs its stages one after another in one command; Lightning starts a data-parallel run's other
    processes inside each stage, where they cannot follow the pipeline's hand-overs: refused, with what works.
    Checked before any work for the command's trainer, and again per stage (a `pipeline.stage_overrides` entry)."""
    processes = data_parallel_processes(trainer)
    if processes > 1:
        where = f" (stage {stage})" if stage else ""
        raise ConfigError(f"pipeline={pipeline} with {processes} training processes{where} (trainer.devices="
                          f"{trainer.get('devices')}, trainer.num_nodes={trainer.get('num_nodes', 1)}): a pipeline "
                          "runs its stages one after another in one command, and Lightning starts the other "
                          "processes inside each stage, where they cannot follow the pipeline's hand-overs. Run the "
                          "stages one by one (rlhf stage=<name> ... trainer=ddp, each given the previous stage's "
                          "model dir), or run the pipeline on one device (trainer.devices=1)")


def run_pipeline(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured stages in order; returns {stage: StageResult}."""
    from hydra.core.hydra_config import HydraConfig

    from framework.pipeline import run_stage

    pipe = cfg.pipeline
    stages = [str(s) for s in pipe.stages]
    given = {s: v for s, v in (pipe.get("inputs") or {}).items() if v}
    unknown = [s for s in [pipe.get("start_at"), pipe.get("stop_after"), *given] if s is not None and s not in stages]
    if unknown:
        raise ConfigError(f"pipeline: unknown stage name(s) {unknown}; this pipeline's stages are {stages}")
    if cfg.get("ckpt_path"):  # the user's overrides reach every stage: one stage's checkpoint would reach all
        raise ConfigError(f"ckpt_path= names one stage's checkpoint, and pipeline={pipe.name} passes its overrides to "
                          "every stage: continue a stopped pipeline with the command it printed "
                          "(pipeline.start_at=<stage> and the inputs made so far)")
    refuse_data_parallel_pipeline(cfg.trainer, str(pipe.name))
    first = stages.index(pipe.start_at) if pipe.get("start_at") else 0
    last = stages.index(pipe.stop_after) if pipe.get("stop_after") else len(stages) - 1
    if last < first:
        raise ConfigError(f"pipeline.stop_after={pipe.stop_after} comes before pipeline.start_at={pipe.start_at}")
    todo = stages[first : last + 1]

    hc = HydraConfig.get()
    searchpath = [o for o in hc.overrides.hydra if _key(o) == "hydra.searchpath"]  # user config groups, every stage
    command_line = [*hc.overrides.task, *searchpath]
    user = [o for o in hc.overrides.task if not _is_pipeline_override(o)]
    if any(_key(o) == "stage" for o in user):
        raise ConfigError(f"pipeline={pipe.name} runs its own stages ({', '.join(stages)}): drop stage=... from the "
                          "command line; choose stages with pipeline.start_at / pipeline.stop_after")
    user += searchpath
    has = {name: stage_settings(name, user, pipe) for name in todo}
    settings = [o for o in user if _is_stage_setting(o)]
    if settings:  # a stage.<key> that no stage of this run has is a typo (or a stage left out): say so before any work
        taken = set().union(*has.values())
        if len(taken) < len(settings):
            missing = [_key(o) for o in settings if o not in taken]
            raise ConfigError(f"{', '.join(missing)}: no stage of this run ({', '.join(todo)}) has that key; check "
                              "the spelling (rlhf --help lists each stage's keys), or add a new key with +stage.<key>=")
    root = Path(cfg.paths.root).expanduser()
    out_dir = Path(cfg.paths.output_dir)
    artifacts = {s: resolve_input(v, s, cfg, out_dir / "inputs" / s) for s, v in given.items()}

    commit = git_commit()
    tags = {"pipeline": str(pipe.name), "stage": "pipeline", "stages": ",".join(todo), "git_commit": commit,
            "mlflow.source.git.commit": commit, "output_dir": str(out_dir.resolve()),
            **{f"input.{s}": str(p) for s, p in artifacts.items()}, **(cfg.logger.get("tags") or {})}
    parent = open_run(cfg.logger, root, f"{pipe.name}-{time.strftime('%Y%m%d-%H%M%S')}", tags)
    print(f"[rlhf] pipeline {pipe.name}: {' -> '.join(todo)}; MLflow {parent.tracking_uri} run {parent.run_id}")
    parent.log_params({"pipeline.stages": ",".join(todo), "pipeline.overrides": " ".join(user)[:MAX_PARAM_CHARS] or "-"})
    record: dict[str, dict] = {s: {"artifact": str(p), "given": True} for s, p in artifacts.items()}
    results, status, current = {}, "FAILED", todo[0]
    try:
        for i, name in enumerate(todo):
            current = name
            stage_cfg, consumed = stage_config(name, user, pipe, artifacts, out_dir / f"{first + i}_{name}", has[name])
            refuse_data_parallel_pipeline(stage_cfg.trainer, str(pipe.name), name)
            print(f"[rlhf] pipeline {pipe.name}: stage {first + i + 1}/{len(stages)} {name}"
                  + "".join(f"\n[rlhf]   {k} <- {v}" for k, v in consumed.items()))
            result = run_stage(stage_cfg, parent_run_id=parent.run_id, pipeline=str(pipe.name))
            results[name] = result
            artifacts[name] = result.artifact_dir.resolve()
            record[name] = {"artifact": str(artifacts[name]), "consumed": consumed,
                            "metrics": {k: float(v) for k, v in (result.metrics or {}).items()}}
            parent.set_tags({f"artifact.{name}": str(artifacts[name]),
                             **{f"consumed.{name}.{k}": v for k, v in consumed.items()}})
            parent.log_text(json.dumps(record, indent=2), "pipeline.json")
            for k, v in (result.metrics or {}).items():
                parent.client.log_metric(parent.run_id, f"{name}/{k}", float(v))
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            done = {s: p for s, p in artifacts.items() if s != current}
            kept = "".join(f"\n[rlhf]   {s}: {p}" for s, p in done.items()) or " none"
            print(f"[rlhf] pipeline {pipe.name}: stage {current!r} did not finish ({status}). The artifacts before "
                  f"it are intact:{kept}\n[rlhf] continue from it with:\n  {resume_command(current, done, command_line)}",
                  flush=True)
        try:
            parent.end(status)
        except Exception as err:
            if status == "FINISHED":
                raise TrackingError(f"could not close the pipeline's MLflow run {parent.run_id}: {err}") from err
            print(f"[rlhf] warning: could not mark the pipeline run {parent.run_id} as {status}: {err}", flush=True)
    print(f"[rlhf] pipeline {pipe.name} done:" + "".join(f"\n[rlhf]   {s}: {r['artifact']}" for s, r in record.items()))
    return results

