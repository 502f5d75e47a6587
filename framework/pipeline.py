"""Run what the config names: one stage (`stage=...`), or the whole recipe (`pipeline=...`, framework/recipe.py);
each stage gets its own tracked MLflow run (nested under the pipeline's run when there is one)."""

from __future__ import annotations

import logging
import os
import time
import warnings
import zipfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from framework.errors import ConfigError, checked_number
from framework.interfaces import PreferenceAlgorithm, Stage, StageContext, StageResult
from framework.interrupts import deferred_interrupts
from framework.tracking import flatten_config, follow_run, git_commit, is_rank_zero, open_run, plugin_targets, read_pointer

CHECKPOINT_NAMES = ("last.ckpt", "on_exception.ckpt")
# config sections (or dotted keys) that must be the same for a checkpoint to fit the run that resumes it: what the
# stage learns from and with (the RL stage's policy, reward, algorithm and KL penalty; the reward stage's labeller
# and the policy whose replies it compares), the seeds (split_seed where the stage splits its data: a run resumed
# with another would train on its former validation items), and the stage's own settings but for RESUME_MAY_CHANGE
RESUME_MUST_MATCH = ("seed", "split_seed", "model", "tokenizer", "dataset", "task", "imitation", "policy", "reward",
                     "algo", "kl", "labeller", "stage")
# stage keys a resumed run may change: how long it runs, how often it checkpoints and evaluates, what it samples for
# show; none of them changes what an update does
RESUME_MAY_CHANGE = ("iterations", "checkpoint_every_n_iterations", "checkpoint_every_n_steps", "eval", "samples",
                     "num_workers", "val_batches")

# Lightning notices that are expected in how we run (fresh checkpoint dir per run, validate() before fit())
QUIET_WARNINGS = (
    r".*ckpt_path=None\)` was called without a model",
    r'.*ckpt_path="last"\) is set, but there is no last checkpoint',
    r".*isinstance\(treespec, LeafSpec\)",
    r"Metric `SpearmanCorrcoef` will save all targets",
    # the RL stage checkpoints at iteration boundaries, after the updates: the state a resume needs (Lightning's
    # advice about saving pre-optimisation state is for checkpoints taken in the middle of a step)
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
    # the RL prompt cursor knows its exact length per rank and is read without worker processes
    r"Your `IterableDataset` has `__len__` defined",
)


class _NoAdverts(logging.Filter):
    """Drops Lightning's "Tip: try installing litlogger / litmodels" notices (printed by every Trainer: once per
    stage, a dozen times in a pipeline); the tracking here is MLflow's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "\U0001f4a1 Tip:" not in str(record.msg)


def quiet_lightning() -> None:
    """The expected-notice filters above (process-wide) and the advert filter on Lightning's rank-zero logger."""
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    rank_zero = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_NoAdverts())


def _saved_config(run_dir: Path) -> DictConfig | None:
    cfg_file = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.load(cfg_file) if cfg_file.exists() else None


def _section(cfg: DictConfig, key: str):
    node = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    section = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
    if key == "stage" and isinstance(section, dict):
        section = {k: v for k, v in section.items() if k not in RESUME_MAY_CHANGE}
        if isinstance(section.get("offline"), dict):
            section["offline"] = {k: v for k, v in section["offline"].items() if k not in RESUME_MAY_CHANGE}
    return section


def _with_new_defaults(saved, current):
    """`saved` (a config section) with the keys that a later version of its plugin added filled in from `current`,
    where `current` holds the plugin's own default for them: the saved run ran with that default before the key
    existed (e.g. GRPO's `kl_estimator`, k3, which was hard-coded before), so it still matches."""
    import inspect

    from framework.instantiate import _import_target

    if not (isinstance(saved, dict) and isinstance(current, dict)) or "_target_" not in saved \
            or saved.get("_target_") != current.get("_target_"):
        return saved
    try:
        params = inspect.signature(_import_target(str(saved["_target_"]), "resume")).parameters
    except (ConfigError, TypeError, ValueError):
        return saved
    filled = dict(saved)
    for key, value in current.items():
        param = params.get(key)
        if key not in saved and param is not None and param.default is not inspect.Parameter.empty \
                and param.default == value:
            filled[key] = value
    return filled


def _checkpoint_state(ckpt: Path) -> dict | None:
    """A checkpoint file's contents (memory-mapped), or None when it does not load: the stage's own loading then
    reports what is wrong with it."""
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=False)
    except Exception:
        return None
    return state if isinstance(state, dict) else None


def requeued_checkpoint(output_dir: Path) -> str | None:
    """A job SLURM requeued (preempted or timed out; SLURM_RESTART_COUNT > 0) runs again with the same overrides in
    the same folder: it continues from that folder's last.ckpt, as Lightning's OnExceptionCheckpoint made it do."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0 and last.is_file():
        print(f"[rlhf] SLURM requeued this job (SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']}): "
              f"continuing from {last}")
        return str(last)
    return None


def refuse_a_used_run_dir(output_dir: Path, ckpt_path: str | None, pipeline: str | None = None) -> None:
    """A run writes its checkpoints to `<output_dir>/checkpoints`: when that folder already holds an earlier run's
    (`hydra.run.dir=` given twice), a new run would overwrite them, so it is refused unless it continues from one of
    them. pipeline: the name of the pipeline the stage runs in (a stage's ckpt_path= is not the fix there)."""
    ckpts = output_dir / "checkpoints"
    held = sorted(p.name for p in ckpts.glob("*.ckpt"))
    if not held or (ckpt_path and Path(ckpt_path).resolve().parent == ckpts.resolve()):
        return
    last = ckpts / ("last.ckpt" if "last.ckpt" in held else held[-1])
    fix = (f"choose another hydra.run.dir for pipeline={pipeline} (or leave it out for a new dated folder)"
           if pipeline else f"choose another hydra.run.dir (or leave it out for a new dated folder), or continue that "
           f"run with ckpt_path={last}")
    raise ConfigError(f"{output_dir} already holds the checkpoints of an earlier run ({', '.join(held[:3])}"
                      f"{', ...' if len(held) > 3 else ''}), which a new run there would overwrite: {fix}")


def _splits_data(cfg: DictConfig) -> bool:
    """Whether the stage splits its data into train and validation by `split_seed`: every training stage but the RL
    stage (by class, whatever its name) with an online algorithm, whose prompts are not split; a class that cannot
    be imported counts as one that splits (the stage names it when it is built)."""
    from hydra.utils import get_class

    from framework.stages.rl import RLStage

    def cls(section: str) -> type:
        return get_class(str((cfg.get(section) or {}).get("_target_")))

    try:
        return not issubclass(cls("stage"), RLStage) or issubclass(cls("algo"), PreferenceAlgorithm)
    except Exception:
        return True


def find_resume_checkpoint(root: Path, cfg: DictConfig, stage_name: str) -> Path:
    """The newest checkpoint of `stage_name` under `<root>/runs|multiruns` whose run used the same config as `cfg`
    in every RESUME_MUST_MATCH section (model, tokenizer, dataset, task, policy, reward, ...)."""
    from framework.stages.rl import written_mid_iteration

    keys = [k for k in RESUME_MUST_MATCH if k != "split_seed" or _splits_data(cfg)]
    candidates, mismatched = [], []
    for sub in ("runs", "multiruns"):
        for name in CHECKPOINT_NAMES:
            for ckpt in (root / sub).glob(f"**/checkpoints/{name}"):
                saved = _saved_config(ckpt.parent.parent)
                if saved is None or saved.get("stage", {}).get("name") != stage_name:
                    continue
                diff = [k for k in keys if _with_new_defaults(_section(saved, k), _section(cfg, k)) != _section(cfg, k)]
                (mismatched if diff else candidates).append((ckpt, diff, saved))
    skipped = []
    for ckpt, _, _ in sorted(candidates, key=lambda c: c[0].stat().st_mtime, reverse=True):
        state = _checkpoint_state(ckpt) if ckpt.name == "on_exception.ckpt" else None
        if state is not None and written_mid_iteration(state):
            print(f"[rlhf] resume: skipping {ckpt}: an error wrote it in the middle of an RL iteration")
            skipped.append(ckpt)
            continue
        if state is not None and state.get("global_step") == 0:  # an older version saved one on an error at step 0
            print(f"[rlhf] resume: skipping {ckpt}: an error wrote it before the first step (no progress in it)")
            continue
        return ckpt
    if skipped:
        raise ConfigError(f"resume=true: the only matching {stage_name!r} checkpoint ({skipped[0]}) was written by an "
                          "error in the middle of an RL iteration and cannot continue the run exactly; start the run "
                          "again without resume")
    if mismatched:
        ckpt, diff, saved = max(mismatched, key=lambda c: c[0].stat().st_mtime)
        seeds = "; ".join(f"{k} {_section(saved, k)} there, {_section(cfg, k)} now" for k in diff
                          if k in ("seed", "split_seed"))
        raise ConfigError(f"resume=true: the newest {stage_name!r} checkpoint ({ckpt}) was made with other "
                          f"{', '.join(diff)} settings{f' ({seeds})' if seeds else ''}; give it explicitly with "
                          "ckpt_path= if you mean it")
    raise ConfigError(f"resume=true: no checkpoint of stage {stage_name!r} under {root}/runs. "
                      "Give one with ckpt_path=/path/to/last.ckpt, or start without resume")


def run(cfg: DictConfig):
    """`pipeline=...`: the stages in order (framework/recipe.py); otherwise the one stage `cfg.stage`."""
    if cfg.get("pipeline"):
        from framework.recipe import run_pipeline

        return run_pipeline(cfg)
    return run_stage(cfg)


def run_stage(cfg: DictConfig, parent_run_id: str | None = None, pipeline: str | None = None) -> StageResult:
    """Run `cfg.stage` with tracking; returns the stage's result. Errors for the user are `RLHFError`s. Within a
    pipeline: parent_run_id nests the run under the pipeline's, and `pipeline` (its name) tags it, as the parent is,
    so that `rlhf compare --tag pipeline=<name> --stage <stage>` finds it."""
    from lightning_fabric.utilities.seed import seed_everything

    from framework.instantiate import instantiate_plugin

    for key in ("seed", "split_seed"):  # read with int() all over: a typo is named here, before any work
        checked_number(key, cfg.get(key), whole=True, at_least=0)
    seed_everything(int(cfg.seed), workers=True, verbose=False)
    quiet_lightning()
    root = Path(cfg.paths.root).expanduser()
    output_dir = Path(cfg.paths.output_dir)
    stage: Stage = instantiate_plugin(cfg.stage, "stage", Stage)

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path and not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r} is not a file")
    if ckpt_path and not zipfile.is_zipfile(ckpt_path):  # torch.save's format; a model's weights file is not one
        raise ConfigError(f"ckpt_path={ckpt_path!r} is not a training checkpoint (the .ckpt files a run writes to "
                          "<run>/checkpoints/); an exported model folder is a starting point instead: model.path= "
                          "(policy.path= for stage=rl)")
    if cfg.get("resume") and not ckpt_path:
        ckpt_path = str(find_resume_checkpoint(root, cfg, stage.name))
    ckpt_path = ckpt_path or requeued_checkpoint(output_dir)
    refuse_a_used_run_dir(output_dir, ckpt_path, pipeline)
    pointer = (read_pointer(Path(ckpt_path).parent.parent) or {}) if ckpt_path else {}  # the MLflow run it goes on
    resume_run_id, resume_store = pointer.get("run_id"), pointer.get("tracking_uri")
    if ckpt_path:
        print(f"[rlhf] resuming from {ckpt_path}" + (f" (MLflow run {resume_run_id})" if resume_run_id else ""))

    if not is_rank_zero():
        tracked = follow_run(output_dir)
        with deferred_interrupts():
            return stage.run(StageContext(cfg=cfg, output_dir=output_dir, run=tracked, ckpt_path=ckpt_path))

    commit = git_commit()
    run_name = cfg.logger.get("run_name") or f"{stage.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {"stage": stage.name, "git_commit": commit, "mlflow.source.git.commit": commit,
            "output_dir": str(output_dir.resolve()), **plugin_targets(cfg),
            **({"pipeline": pipeline} if pipeline else {}),
            **(cfg.logger.get("tags") or {})}  # the user's tags last, as on the pipeline's own run
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tracked = open_run(cfg.logger, root, run_name, tags, resume_run_id=resume_run_id, resume_store=resume_store)
    resume_run_id = resume_run_id if tracked.run_id == resume_run_id else None  # None: a new run in another store
    tracked.save_pointer(output_dir)
    print(f"[rlhf] MLflow: {tracked.tracking_uri}  run {tracked.run_id}")
    if tracked.tracking_uri.startswith("sqlite:///"):
        print(f"[rlhf]   open it with: mlflow ui --backend-store-uri {tracked.tracking_uri}")

    status = "FAILED"
    try:
        if resume_run_id:
            tracked.set_tags(tags)
        tracked.log_params(flatten_config(cfg))
        tracked.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/resolved.yaml")
        with deferred_interrupts():
            result = stage.run(StageContext(cfg=cfg, output_dir=output_dir, run=tracked, ckpt_path=ckpt_path))
        tracked.set_tags({"artifact_dir": str(result.artifact_dir.resolve())})
        status = "FINISHED"
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C during fit() into SystemExit(1)
        status = "KILLED"
        raise
    finally:
        ckpts = output_dir / "checkpoints"
        if status != "FINISHED":
            hint = (f"; its checkpoints are in {ckpts}: continue with `resume=true` or ckpt_path=..."
                    if any(ckpts.glob("*.ckpt")) else "")
            print(f"[rlhf] stage {stage.name!r} did not finish ({status}){hint}", flush=True)
        try:
            tracked.end(status)
        except Exception as err:  # a broken store must not hide the stage's own error or lose the checkpoints
            if status == "FINISHED":
                raise
            print(f"[rlhf] warning: could not mark MLflow run {tracked.run_id} as {status} "
                  f"({type(err).__name__}: {err}); the run's files and checkpoints are untouched", flush=True)
    print(f"[rlhf] {stage.name} done: {result.artifact_dir}")
    return result
