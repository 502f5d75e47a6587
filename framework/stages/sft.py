"""Stage 2, supervised fine-tuning: imitation of demonstrations (loss on response tokens only) by an imitation
algorithm plugin (`imitation=bc` behaviour cloning, `imitation=dagger`, or yours), optionally on a task with a
gold scorer and an expert."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, RandomSampler

from framework.data import ListDataset, split_records
from framework.distributed import ValidationShare
from framework.errors import ConfigError, DataError
from framework.imitation import (
    IGNORE_INDEX,
    PromptEncoder,
    check_format,
    encode_demonstrations,
    encode_prompt,
    evaluate_task,
    stop_token_id,
)
from framework.instantiate import instantiate_plugin
from framework.interfaces import (
    DemonstrationDataset,
    Example,
    Expert,
    ImitationAlgorithm,
    ImitationContext,
    Stage,
    StageContext,
    StageResult,
    Task,
)
from framework.models import context_length, count_parameters
from framework.stages.common import (
    SampleSettings,
    bounded,
    build_tokenizer_and_model,
    build_trainer,
    check_max_steps,
    check_optimizer_keys,
    check_stage_sizes,
    export_causal_lm,
    lm_loss,
    log_samples,
    read_section,
)
from framework.stages.lm_module import CausalLMModule


def collate_examples(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: input_ids with PAD, labels with -100, attention_mask 1 on real tokens."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[i, :n] = torch.tensor(ex.input_ids)
        labels[i, :n] = torch.tensor(ex.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class ImitationDataModule(pl.LightningDataModule):
    """One Lightning epoch per imitation round: each epoch asks the algorithm for that round's dataset (built with
    the learner's current weights) and samples `steps_per_round` batches from it. The algorithm's state (e.g.
    DAgger's aggregate) is saved in checkpoints."""

    def __init__(self, algorithm: ImitationAlgorithm, make_context: Callable[[], ImitationContext],
                 val_examples: list[Example], batch_size: int, steps_per_round: int, pad_id: int, seed: int,
                 num_workers: int = 0, val_batches: int | None = None):
        """val_batches: validate on the first this many batches of `val_examples` (None: all), over every
        process."""
        super().__init__()
        self.val_batches = val_batches
        self.algorithm, self.make_context, self.val_examples = algorithm, make_context, val_examples
        self.batch_size, self.steps_per_round, self.pad_id = batch_size, steps_per_round, pad_id
        self.seed, self.num_workers = seed, num_workers
        self.last_round_metrics: dict[str, float] = {}

    def train_dataloader(self) -> DataLoader:
        round_idx = self.trainer.current_epoch if self.trainer is not None else 0
        examples = self.algorithm.round_dataset(round_idx, self.make_context())
        if not examples:
            raise DataError(f"imitation round {round_idx} produced an empty dataset")
        self.last_round_metrics = self.algorithm.round_metrics()
        # Each rank draws its own steps_per_round batches (Lightning's DistributedSampler is switched off for this
        # stage: it would drop replacement and the step count).
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = RandomSampler(ListDataset(examples), replacement=True,
                                num_samples=self.steps_per_round * self.batch_size,
                                generator=torch.Generator().manual_seed(self.seed + 1000 * round_idx + 7919 * rank))
        return DataLoader(ListDataset(examples), batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          collate_fn=partial(collate_examples, pad_id=self.pad_id), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ListDataset(self.val_examples), batch_size=self.batch_size, num_workers=self.num_workers,
                          sampler=ValidationShare(len(self.val_examples), self.val_batches, self.batch_size),
                          collate_fn=partial(collate_examples, pad_id=self.pad_id))

    def state_dict(self) -> dict:
        return {"algorithm": self.algorithm.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.algorithm.load_state_dict(state.get("algorithm", {}))


class RoundMetrics(pl.Callback):
    """Logs the imitation algorithm's bookkeeping (dataset size, expert labels, beta) at the start of each round."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = getattr(trainer.datamodule, "last_round_metrics", {})
        if metrics and trainer.logger is not None:
            trainer.logger.log_metrics({f"imitation/{k}": float(v) for k, v in metrics.items()}, step=trainer.global_step)
            print("[rlhf] imitation round " + ", ".join(f"{k}={v:g}" for k, v in metrics.items()))


@dataclass(frozen=True)
class SFTEvalSettings:
    """`stage.eval` of sft: with a task, held-out task prompts scored with greedy decoding at each validation."""

    prompts: int = bounded(64, at_least=1, note="with a task, the held-out evaluation always runs")
    max_new_tokens: int = bounded(64, at_least=1)

    @classmethod
    def from_config(cls, settings: Mapping | None) -> SFTEvalSettings:
        return read_section("stage.eval", cls, settings)


class SFTStage(Stage):
    def __init__(self, name: str = "sft", format: str = "chat", max_length: int = 256, batch_size: int = 16,
                 val_fraction: float = 0.05, val_batches: int | None = 8, num_workers: int = 0,
                 optimizer: Mapping | None = None, scheduler: Mapping | None = None,
                 checkpoint_every_n_steps: int = 100, rollout_prompts: int = 1000,
                 eval: Mapping | None = None, samples: Mapping | None = None):
        check_format(format)
        self.name, self.format, self.max_length = name, format, max_length
        self.batch_size, self.val_fraction, self.val_batches = batch_size, val_fraction, val_batches
        check_stage_sizes(val_fraction, batch_size, val_batches, max_length=max_length)
        self.num_workers = num_workers
        self.optimizer = dict(optimizer or {"lr": 1e-3})
        self.scheduler = dict(scheduler or {})
        check_optimizer_keys(self.optimizer, self.scheduler)
        self.checkpoint_every_n_steps, self.rollout_prompts = checkpoint_every_n_steps, rollout_prompts
        self.eval = SFTEvalSettings.from_config(eval)
        self.samples = SampleSettings.from_config(samples)

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.cfg
        check_max_steps(cfg.trainer.get("max_steps"))
        loss = lm_loss(cfg, self.name)
        algorithm: ImitationAlgorithm = instantiate_plugin(cfg.imitation, "imitation", ImitationAlgorithm)
        task: Task | None = instantiate_plugin(cfg.task, "task", Task) if cfg.get("task") else None
        dataset: DemonstrationDataset = instantiate_plugin(cfg.dataset, "dataset", DemonstrationDataset)
        demos = list(dataset.demonstrations())
        if not demos:
            raise DataError(f"{dataset.describe()}: no demonstrations")
        train_demos, val_demos = split_records(demos, self.val_fraction, seed=cfg.split_seed)
        print(f"[rlhf] demonstrations: {dataset.describe()}: {len(demos)} -> {len(train_demos)} train / "
              f"{len(val_demos)} val")
        if not train_demos:  # the split put every one of a handful into validation
            raise DataError(f"{dataset.describe()}: all {len(demos)} demonstrations fell into the validation split "
                            f"(stage.val_fraction={self.val_fraction}); give more demonstrations, or set "
                            "stage.val_fraction=0 to train on all of them")

        tokenizer, model = build_tokenizer_and_model(cfg, [d.text() for d in train_demos])
        n_ctx = context_length(model)
        if n_ctx is not None and self.max_length > n_ctx:
            raise ConfigError(f"stage.max_length={self.max_length} exceeds the model's context length {n_ctx}")
        print(f"[rlhf] model: {type(model).__name__}, {count_parameters(model) / 1e6:.2f} M parameters; "
              f"vocab {len(tokenizer)}; format {self.format}")
        stop_id = stop_token_id(tokenizer, self.format)
        expert: Expert | None = None
        if cfg.get("expert"):
            expert = instantiate_plugin(cfg.expert, "expert", Expert)
            expert.setup(tokenizer, stop_id, task)

        train_examples = encode_demonstrations(tokenizer, train_demos, self.format, self.max_length)
        val_examples = encode_demonstrations(tokenizer, val_demos, self.format, self.max_length) if val_demos else []
        max_new = self.eval.max_new_tokens
        evaluator, rollout_prompts, encoder = None, [], None
        if task is not None:
            seen = {d.prompt for d in demos if d.prompt is not None}
            held_out = [p for p in task.prompts(self.eval.prompts, cfg.seed + 7919) if p.text not in seen]
            if not held_out:
                raise ConfigError(f"task {task.name}: every held-out prompt is also a demonstration; the task has too "
                                  "few distinct prompts for that many demonstrations (lower dataset.n)")
            # prompts to roll out on: their own stream, never a validation or held-out prompt
            excluded = {d.prompt for d in val_demos} | {p.text for p in held_out}
            rollout_prompts = [p for p in task.prompts(self.rollout_prompts, cfg.seed + 1) if p.text not in excluded]
            encoder = PromptEncoder(tokenizer, self.format, n_ctx, max_new)
            for p in held_out + rollout_prompts:
                encoder(p.text)
            if encoder.truncated:
                print(f"[rlhf] warning: {encoder.truncated} of {len(held_out) + len(rollout_prompts)} task prompts are "
                      f"longer than {encoder.room} tokens (context {n_ctx} - stage.eval.max_new_tokens {max_new}); "
                      "evaluation and rollouts see them cut from the left")
            evaluator = lambda m: evaluate_task(m, tokenizer, task, held_out, self.format, max_new, expert,  # noqa: E731
                                                encode=encoder)[0]
        if algorithm.requires_expert and (expert is None or task is None):
            raise ConfigError(f"imitation {type(algorithm).__name__} needs a task to roll out on and an expert to "
                              "label states: add task=<sort|addition|reasoning_gym> expert=task (or expert=teacher_lm)")

        def make_context() -> ImitationContext:
            return ImitationContext(
                demonstrations=train_examples, prompts=rollout_prompts,
                encode_prompt=lambda p: encoder(p.text) if encoder else encode_prompt(tokenizer, p.text, self.format),
                model=model,
                tokenizer=tokenizer, stop_id=stop_id, max_new_tokens=max_new, expert=expert, seed=int(cfg.seed))

        rounds = int(algorithm.num_rounds)
        max_steps = int(cfg.trainer.max_steps)
        if max_steps < rounds:
            raise ConfigError(f"trainer.max_steps={max_steps} is fewer than the {rounds} imitation rounds")
        data = ImitationDataModule(algorithm, make_context, val_examples, self.batch_size, max_steps // rounds,
                                   tokenizer.pad_token_id, int(cfg.seed), self.num_workers, self.val_batches)
        ctx.run.log_params({"data.train_demonstrations": str(len(train_examples)),
                            "data.val_demonstrations": str(len(val_examples))})
        module = CausalLMModule(model, loss, self.optimizer, self.scheduler,
                                evaluator=evaluator)
        trainer = build_trainer(ctx, callbacks=[RoundMetrics()], every_n_steps=self.checkpoint_every_n_steps,
                                # stage.val_batches caps the validation set in its loader (ValidationShare)
                                limit_val_batches=1.0 if val_examples else 0,
                                max_epochs=rounds, limit_train_batches=max_steps // rounds,
                                reload_dataloaders_every_n_epochs=1, use_distributed_sampler=False)
        if ctx.ckpt_path is None:  # the starting model's scores at step 0 (what SFT must improve on)
            trainer.validate(module, datamodule=data, verbose=False)
        trainer.fit(module, datamodule=data, ckpt_path=ctx.ckpt_path)
        results = trainer.validate(module, datamodule=data, verbose=False) if val_examples else []
        final = dict(results[0]) if results else {}
        if evaluator is not None and not val_examples and trainer.is_global_zero:  # no validation loop ran it
            final.update(evaluator(model))
            trainer.logger.log_metrics(final, step=trainer.global_step)

        artifact_dir = ctx.output_dir / "model"
        if trainer.is_global_zero:
            export_causal_lm(model, tokenizer, artifact_dir, max_new)
            log_samples(ctx, model, tokenizer, self.samples,
                        encode=lambda text: encode_prompt(tokenizer, text, self.format), stop_ids=[stop_id])
            logged = ctx.run.log_dir(artifact_dir, "model", float(cfg.logger.get("log_model_max_mb", 200)))
            print(f"[rlhf] exported model + tokenizer to {artifact_dir}" + ("" if logged else " (path tagged)"))
            for k in ("eval/gold", "eval/exact_match", "eval/mistakes_per_seq"):
                if k in final:
                    print(f"[rlhf] {k} = {final[k]:.4f}")
        return StageResult(artifact_dir=artifact_dir, metrics={k: float(v) for k, v in final.items()})
