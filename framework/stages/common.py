"""Pieces every stage shares: resolving model + tokenizer, the Trainer, optimizers, schedules, export."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from omegaconf import DictConfig

from framework.errors import ConfigError, checked_number, refuse_unknown_keys
from framework.instantiate import instantiate_plugin
from framework.distributed import was_raised_everywhere
from framework.interrupts import stop_callback
from framework.interfaces import Loss, ModelSource, StageContext, TokenizerSource
from framework.models import context_length
from framework.tokenization import has_tokenizer_files, load_tokenizer, stop_token_ids


def bounded(default: int | float, at_least: float | None = None, above: float | None = None,
            below: float | None = None, at_most: float | None = None, note: str = ""):
    """A numeric field of a settings dataclass read by `read_section`, with its range: value >= at_least or
    > above, and < below or <= at_most (each optional); `note` ends the message of a value outside it (what 0
    means, an example)."""
    return field(default=default, metadata={"at_least": at_least, "above": above, "below": below,
                                            "at_most": at_most, "note": note})


def read_section(section: str, cls, settings: Mapping | None):
    """A config mapping the code reads itself (`stage.offline`, `stage.eval`, `stage.samples`, `stage.normalize`) as
    an instance of the dataclass `cls`, whose fields have defaults: numbers (`bounded` ones with a range) or a tuple
    of strings (a list in the config). Unknown keys are refused with the closest one; a value of the wrong kind
    (not a finite number, a fraction for a whole-number field, not a list of strings) or outside its range is
    named `<section>.<key>` with the fix. Stages read theirs when built, before any model is loaded."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(settings):
        settings = OmegaConf.to_container(settings, resolve=True)
    if settings is not None and not isinstance(settings, Mapping):
        raise ConfigError(f"{section}={settings!r} must be a mapping of its keys "
                          f"({', '.join(f.name for f in fields(cls))})")
    settings = dict(settings or {})
    refuse_unknown_keys(section, settings, [f.name for f in fields(cls)])
    values = {}
    for f in fields(cls):
        value, default, key = settings.get(f.name, f.default), f.default, f"{section}.{f.name}"
        if isinstance(default, tuple):
            value = () if value is None else value
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{key}={value!r} must be a list of strings, e.g. {key}='[\"Hello\"]' (or [] for "
                                  "none)")
            values[f.name] = tuple(value)
            continue
        values[f.name] = checked_number(key, value, whole=isinstance(default, int), default=default,
                                        **{k: f.metadata.get(k) for k in ("at_least", "above", "below", "at_most")},
                                        note=f.metadata.get("note") or "")
    return cls(**values)


@dataclass(frozen=True)
class SampleSettings:
    """`stage.samples` of pretrain and sft: a completion of each prompt, sampled after training, printed and logged
    as the `samples.json` table (`log_samples`)."""

    prompts: tuple[str, ...] = ()
    max_new_tokens: int = bounded(40, at_least=1)
    temperature: float = bounded(0.8, above=0)
    top_p: float = bounded(0.95, above=0, at_most=1)

    @classmethod
    def from_config(cls, settings: Mapping | None) -> SampleSettings:
        return read_section("stage.samples", cls, settings)


def lm_loss(cfg: DictConfig, stage: str) -> Loss:
    """The `loss` plugin of a stage that trains a causal LM on next-token labels (pretrain, sft), built and checked
    before any work: a loss of another kind is refused by name."""
    loss: Loss = instantiate_plugin(cfg.loss, "loss", Loss)
    if loss.kind != "lm":
        raise ConfigError(f"loss._target_={cfg.loss._target_} is a {loss.kind!r} loss; stage={stage} trains a causal "
                          "LM on next-token labels: loss=lm_cross_entropy (or a Loss of kind 'lm')")
    return loss


def build_tokenizer_and_model(cfg: DictConfig, corpus: Sequence[str]):
    """The tokenizer (trained, cached, or the model dir's own) and the model sized to it."""
    source: TokenizerSource = instantiate_plugin(cfg.tokenizer, "tokenizer", TokenizerSource)
    model_source: ModelSource = instantiate_plugin(cfg.model, "model", ModelSource)
    if model_source.path and source.trains:
        local = Path(model_source.path).expanduser()
        if local.is_dir() and not has_tokenizer_files(local):
            raise ConfigError(
                f"model.path={model_source.path!r} has no tokenizer files; a trained model needs the tokenizer it "
                "was trained with: save it there, or pass tokenizer=pretrained tokenizer.path=<its dir>"
            )
        tokenizer = load_tokenizer(model_source.path, allow_download=getattr(model_source, "allow_download", False))
    else:
        tokenizer = source.build(corpus, Path(cfg.paths.cache_dir))
    model = model_source.build(tokenizer)
    n_ctx = context_length(model)
    if n_ctx:
        tokenizer.model_max_length = n_ctx
    return tokenizer, model


def check_stage_sizes(val_fraction: float, batch_size: int, val_batches: int | None = None, **lengths: int) -> None:
    """The sizes every training stage needs to be sane, with the key to fix; a stage checks them when it is built.
    val_batches: the validation batches of a stage that caps them (a number of batches over every process)."""
    checked_number("stage.val_fraction", val_fraction, at_least=0, below=1)
    checked_number("stage.batch_size", batch_size, whole=True, at_least=1)
    checked_number("stage.val_batches", val_batches, whole=True, at_least=0, allow_none=True, note="0 or null: all")
    for key, value in lengths.items():
        checked_number(f"stage.{key}", value, whole=True, at_least=2, note="tokens")


def check_max_steps(max_steps: int | None) -> None:
    """A stage sized by `trainer.max_steps` needs a positive whole number (Lightning's -1, "no limit", is refused)."""
    checked_number("trainer.max_steps", max_steps, whole=True, allow_none=True)
    if max_steps is None or max_steps <= 0:
        raise ConfigError(f"trainer.max_steps={max_steps}: stages train for a number of optimizer steps; set it > 0")


def data_shards(ctx: StageContext) -> int:
    """Into how many shares Lightning's distributed sampler splits a stage's training data: the processes
    `cfg.trainer` trains on (devices x nodes, as Lightning resolves them), or 1 with
    `trainer.use_distributed_sampler=false` (every process then reads all of it). Known before the stage's own
    Trainer is built, so that a stage that trains for a number of epochs sizes its steps by it. A throwaway Trainer
    does the resolving (nothing starts until `fit`; the stage sets its own length, so this one gets none); its
    start-up notices are held back."""
    import logging

    if ctx.cfg.trainer.get("use_distributed_sampler", True) is False:
        return 1
    notices = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = notices.level
    notices.setLevel(logging.WARNING)
    try:
        trainer = instantiate_plugin(ctx.cfg.trainer, "trainer", None, logger=False, enable_checkpointing=False,
                                     enable_progress_bar=False, enable_model_summary=False, callbacks=[],
                                     max_steps=-1)
    finally:
        notices.setLevel(level)
    return int(trainer.world_size)


def epoch_batches(examples: int, batch_size: int, world_size: int = 1) -> tuple[int, bool]:
    """(batches one rank's loader yields per epoch, whether it drops a last partial batch) for `examples` split
    over `world_size` ranks. Lightning's DistributedSampler gives each rank ceil(examples / world_size) (repeating
    a few to even them out); a last partial batch is dropped unless the rank's share makes less than one batch."""
    share = math.ceil(examples / world_size)
    drop_last = share > batch_size
    return (share // batch_size if drop_last else 1), drop_last


def nothing_trained_notice(lengthen: str):
    """A Lightning callback that says so when a fit resumed from a checkpoint trains nothing because the checkpoint
    is already at the end of the run (Lightning returns at once, silently); `lengthen` says how to make the run
    longer."""
    from pytorch_lightning import Callback

    class NothingTrainedNotice(Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            self.trained = False

        def on_train_batch_start(self, trainer, *args: Any) -> None:
            self.trained = True

        def on_fit_end(self, trainer, pl_module) -> None:
            if trainer.ckpt_path and not self.trained and trainer.is_global_zero:
                where = (f"iteration {pl_module.iteration}" if isinstance(getattr(pl_module, "iteration", None), int)
                         else f"step {trainer.global_step}")
                print(f"[rlhf] resume: nothing to train: {trainer.ckpt_path} is already at the end of the run "
                      f"({where}), so the model it holds is evaluated and exported again as it is. To train on: "
                      f"{lengthen}", flush=True)

    return NothingTrainedNotice()


def exception_checkpoint(dirpath: Path, filename: str = "on_exception.ckpt"):
    """A Lightning callback that saves the training state when fit stops on an exception or Ctrl-C, as Lightning's
    `OnExceptionCheckpoint` does, but only once a step has been taken (a step-0 file holds no progress, and
    `resume=true`, which takes the newest checkpoint, would start over from it), and without the side effect of
    that class: while one is among the callbacks, Lightning turns `fit(ckpt_path=None)` into "last", so a new run
    in a folder that holds an earlier run's checkpoints would silently continue it."""
    from pytorch_lightning import Callback

    class ExceptionCheckpoint(Callback):
        ckpt_path = str(Path(dirpath) / filename)

        def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
            # under DDP saving is a collective (it ends in a barrier): only for a stop every process took together
            # (Ctrl-C, a NaN reward, `failing_together`); a process that failed alone would wait there forever
            # for the others, and the run falls back on its last periodic checkpoint
            if trainer.global_step > 0 and (trainer.world_size == 1 or was_raised_everywhere(exception)):
                trainer.save_checkpoint(self.ckpt_path)

        def teardown(self, trainer, pl_module, stage: str) -> None:  # a fit that ends well leaves no such file
            if stage == "fit":
                trainer.strategy.remove_checkpoint(self.ckpt_path)

    return ExceptionCheckpoint()


def build_trainer(ctx: StageContext, callbacks: list, every_n_steps: int, overrides: Mapping[str, Any] | None = None,
                  lengthen: str = "raise trainer.max_steps and resume again", **defaults: Any):
    """`cfg.trainer` + our logger and checkpoint callbacks; checkpoints go to <output_dir>/checkpoints.

    defaults: Trainer arguments the stage chooses unless the user set them in `trainer.*`.
    overrides: Trainer arguments the stage has resolved from its own settings (e.g. max_steps from stage.epochs).
    lengthen: how to make the run longer, said when a resumed run has nothing left to train.
    """
    from pytorch_lightning.callbacks import ModelCheckpoint

    ckpt_dir = ctx.output_dir / "checkpoints"
    checkpointing = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="step{step}", auto_insert_metric_name=False,
                        every_n_train_steps=every_n_steps, save_last=True, save_top_k=1),
        exception_checkpoint(ckpt_dir),
        stop_callback(),
        nothing_trained_notice(lengthen),
    ]
    return instantiate_plugin(
        ctx.cfg.trainer, "trainer", None,
        logger=ctx.run.lightning_logger(),
        callbacks=[*checkpointing, *callbacks],
        default_root_dir=str(ctx.output_dir),
        **{k: v for k, v in defaults.items() if k not in ctx.cfg.trainer},
        **dict(overrides or {}),
    )


def adamw_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (dim >= 2) only; biases and norm gains are not decayed (nanoGPT's rule)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


OPTIMIZER_KEYS = ("lr", "weight_decay", "betas", "eps", "fused")
SCHEDULER_KEYS = ("warmup_steps", "min_lr_ratio")
MIXED_PRECISION = ("16-mixed", "bf16-mixed")


def policy_path(cfg: DictConfig) -> tuple[str | None, str]:
    """The policy a stage starts from or judges: `policy.path`, else `model.path`; with the key that gave it, which
    the stage's errors name (None and "policy.path" when neither is set)."""
    given = (cfg.get("policy") or {}).get("path")
    if given or not cfg.model.get("path"):
        return (str(given) if given else None), "policy.path"
    return str(cfg.model.path), "model.path"


def check_optimizer_keys(optimizer: Mapping[str, Any], scheduler: Mapping[str, Any]) -> None:
    """Refuse a key of `stage.optimizer` / `stage.scheduler` that `adamw_warmup_cosine` does not read (e.g. a misspelt
    `+stage.optimizer.weight_decayy=`); stages call it when built, before any work."""
    refuse_unknown_keys("stage.optimizer", optimizer, OPTIMIZER_KEYS)
    refuse_unknown_keys("stage.scheduler", scheduler, SCHEDULER_KEYS)
    # their values too, by key: torch would refuse some only when the optimizer is built, after the data and model
    checked_number("stage.optimizer.lr", optimizer.get("lr"), at_least=0, note="e.g. 1e-4")
    checked_number("stage.optimizer.weight_decay", optimizer.get("weight_decay", 0.0), at_least=0)
    checked_number("stage.optimizer.eps", optimizer.get("eps", 1e-8), at_least=0)
    betas = optimizer.get("betas", (0.9, 0.95))
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise ConfigError(f"stage.optimizer.betas={betas!r} must be two numbers, e.g. [0.9,0.95]")
    for i, beta in enumerate(betas):
        checked_number(f"stage.optimizer.betas[{i}]", beta, at_least=0, below=1)
    checked_number("stage.scheduler.warmup_steps", scheduler.get("warmup_steps", 0), whole=True, at_least=0)
    checked_number("stage.scheduler.min_lr_ratio", scheduler.get("min_lr_ratio", 0.1), at_least=0, at_most=1)


def use_fused_adamw(model: torch.nn.Module, fused: bool | str, precision: str = "32-true",
                    gradient_clip: float | None = None, clip_key: str = "trainer.gradient_clip_val") -> bool | None:
    """`optimizer.fused`: true/false, or "auto": the fused kernel (one pass over all parameters, ~4x faster steps
    on CPU here) where torch has it for this device: CPU needs torch >= 2.4; floating-point parameters only.
    Not fused, `adamw_warmup_cosine` takes the foreach kernel (one call per operation over all parameters).

    Lightning cannot clip the gradients of a fused AdamW under mixed precision (its step unscales them itself), so
    with `precision` 16-mixed/bf16-mixed and `gradient_clip` on, "auto" is not fused and `true` is refused.
    clip_key: the setting `gradient_clip` came from, named in that message.
    """
    if fused not in (True, False, "auto"):
        raise ConfigError(f"stage.optimizer.fused={fused!r}: use true, false or auto")
    clips_mixed = str(precision) in MIXED_PRECISION and bool(gradient_clip)
    if fused != "auto":
        if fused and clips_mixed:
            raise ConfigError(
                f"stage.optimizer.fused=true with trainer.precision={precision} and {clip_key}={gradient_clip}: "
                "Lightning cannot clip the gradients of a fused AdamW under mixed precision (its step unscales them "
                f"itself); set stage.optimizer.fused=auto (or false), trainer.precision=32-true, or {clip_key}=null"
            )
        return bool(fused)
    params = [p for p in model.parameters() if p.requires_grad]
    if clips_mixed or not params or not all(p.is_floating_point() for p in params):
        return None
    device = params[0].device.type
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return True if device == "cuda" or (device == "cpu" and (major, minor) >= (2, 4)) else None


def adamw_warmup_cosine(model: torch.nn.Module, total_steps: int, optimizer: Mapping[str, Any],
                        scheduler: Mapping[str, Any], precision: str = "32-true", gradient_clip: float | None = None,
                        clip_key: str = "trainer.gradient_clip_val") -> dict:
    """What `configure_optimizers` returns in every training stage: AdamW (`adamw_param_groups`) with a linear warmup
    then cosine decay over `total_steps`, stepped per optimizer step.

    optimizer / scheduler: `stage.optimizer` (`OPTIMIZER_KEYS`) and `stage.scheduler` (`SCHEDULER_KEYS`); another key
    is refused. precision, gradient_clip, clip_key: the trainer's precision and the stage's gradient clipping, which
    decide the AdamW kernel (`use_fused_adamw`).
    """
    from functools import partial

    check_optimizer_keys(optimizer, scheduler)
    fused = use_fused_adamw(model, optimizer.get("fused", "auto"), precision, gradient_clip, clip_key)
    opt = torch.optim.AdamW(
        adamw_param_groups(model, optimizer.get("weight_decay", 0.0)),
        lr=optimizer["lr"],
        betas=tuple(optimizer.get("betas", (0.9, 0.95))),
        eps=optimizer.get("eps", 1e-8),
        fused=fused,
        foreach=None if fused else True,
    )
    schedule = partial(warmup_cosine, warmup_steps=int(scheduler.get("warmup_steps", 0)), total_steps=total_steps,
                       min_ratio=float(scheduler.get("min_lr_ratio", 0.1)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear from 1/warmup to 1 over warmup_steps, then cosine to min_ratio at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def export_causal_lm(model, tokenizer, out_dir: Path, max_new_tokens: int = 64) -> Path:
    """Write a directory that plain `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load."""
    from transformers import GenerationConfig

    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        max_new_tokens=max_new_tokens,
    )
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def log_samples(ctx: StageContext, model, tokenizer, samples: SampleSettings,
                encode: Callable[[str], list[int]] | None = None, stop_ids: Sequence[int] | None = None) -> None:
    """Sample a completion for each of `samples.prompts`, print them, and log them as the `samples.json` table.

    encode: prompt text -> token ids (default: the raw text, no special tokens; SFT passes its chat formatting).
    """
    from framework.rollout import HFGenerator, SamplingSettings

    prompts = list(samples.prompts)
    if not prompts:
        return
    settings = SamplingSettings(max_new_tokens=samples.max_new_tokens, temperature=samples.temperature,
                                top_p=samples.top_p)
    encode = encode or (lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    torch.manual_seed(ctx.cfg.seed)
    gen = HFGenerator(model, tokenizer, stop_ids or stop_token_ids(tokenizer))
    out = gen.generate_ids([encode(p) for p in prompts], settings)
    completions = tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
    print("[rlhf] samples:")
    for p, c in zip(prompts, completions):
        print(f"  {p!r} -> {c!r}")
    ctx.run.log_table({"prompt": prompts, "completion": completions}, "samples.json")


def log_interval(configured: int | None, steps: int) -> int:
    """`trainer.log_every_n_steps`, but at most the run's steps, so that a run shorter than the interval still logs
    its `train/*` metrics (Lightning logs at every multiple of it); 0 (logging off) stays 0."""
    every = 50 if configured is None else int(configured)  # 50: Lightning's own default
    return every if every <= 0 else min(every, steps)
