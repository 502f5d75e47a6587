"""Run what the config names: today one stage (`stage=...`); each stage gets its own tracked MLflow run."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from framework.errors import ConfigError
from framework.interfaces import Stage, StageContext, StageResult
from framework.tracking import (
    RUN_FILE,
    flatten_config,
    follow_run,
    git_commit,
    is_rank_zero,
    open_run,
    plugin_targets,
)

CHECKPOINT_NAMES = ("last.ckpt", "on_exception.ckpt")

# Lightning notices that are expected in how we run (fresh checkpoint dir per run, validate() before fit())
QUIET_WARNINGS = (
    r".*ckpt_path=None\)` was called without a model",
    r'.*ckpt_path="last"\) is set, but there is no last checkpoint',
    r".*isinstance\(treespec, LeafSpec\)",
)


def find_resume_checkpoint(root: Path, stage_name: str) -> Path:
    """The newest checkpoint of `stage_name` under `<root>/runs` and `<root>/multiruns`."""
    found = [
        p
        for sub in ("runs", "multiruns")
        for name in CHECKPOINT_NAMES
        for p in (root / sub).glob(f"**/checkpoints/{name}")
        if _stage_of(p.parent.parent) == stage_name
    ]
    if not found:
        raise ConfigError(
            f"resume=true: no checkpoint of stage {stage_name!r} under {root}/runs. "
            "Give one with ckpt_path=/path/to/last.ckpt, or start without resume"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def _stage_of(run_dir: Path) -> str | None:
    cfg_file = run_dir / ".hydra" / "config.yaml"
    if cfg_file.exists():
        return OmegaConf.load(cfg_file).get("stage", {}).get("name")
    return None


def _resume_run_id(ckpt: Path) -> str | None:
    pointer = ckpt.parent.parent / RUN_FILE
    if pointer.exists():
        return json.loads(pointer.read_text()).get("run_id")
    return None


def run(cfg: DictConfig) -> StageResult:
    """Run `cfg.stage` with tracking; returns the stage's result. Errors for the user are `RLHFError`s."""
    from lightning_fabric.utilities.seed import seed_everything

    from framework.instantiate import instantiate_plugin

    seed_everything(int(cfg.seed), workers=True, verbose=False)
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    root = Path(cfg.paths.root).expanduser()
    output_dir = Path(cfg.paths.output_dir)
    stage: Stage = instantiate_plugin(cfg.stage, "stage", Stage)

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r} is not a file")
    if cfg.get("resume") and not ckpt_path:
        ckpt_path = str(find_resume_checkpoint(root, stage.name))
    resume_run_id = _resume_run_id(Path(ckpt_path)) if ckpt_path else None
    if ckpt_path:
        print(f"[rlhf] resuming from {ckpt_path}" + (f" (MLflow run {resume_run_id})" if resume_run_id else ""))

    run_name = cfg.logger.get("run_name") or f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {"stage": stage.name, "git_commit": git_commit(), "mlflow.source.git.commit": git_commit(),
            "output_dir": str(output_dir.resolve()), **plugin_targets(cfg), **(cfg.logger.get("tags") or {})}
    if is_rank_zero():
        tracked = open_run(cfg.logger, root, run_name, tags, resume_run_id=resume_run_id)
        tracked.save_pointer(output_dir)
        print(f"[rlhf] MLflow: {tracked.tracking_uri}  run {tracked.run_id}")
        if tracked.tracking_uri.startswith("sqlite:///"):
            print(f"[rlhf]   open it with: mlflow ui --backend-store-uri {tracked.tracking_uri}")
    else:
        tracked = follow_run(output_dir)

    status = "FAILED"
    try:
        if resume_run_id:
            tracked.set_tags(tags)
        tracked.log_params(flatten_config(cfg))
        tracked.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
        result = stage.run(StageContext(cfg=cfg, output_dir=output_dir, run=tracked, ckpt_path=ckpt_path))
        tracked.set_tags({"artifact_dir": str(result.artifact_dir.resolve())})
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracked.end(status)
        if status != "FINISHED":
            print(f"[rlhf] stage {stage.name!r} did not finish ({status}); checkpoints, if any, are in "
                  f"{output_dir / 'checkpoints'}; continue with `resume=true` or ckpt_path=...")
    print(f"[rlhf] {stage.name} done: {result.artifact_dir}")
    return result
