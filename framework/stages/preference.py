"""Offline preference optimisation of a policy (algo=dpo): the policy and a frozen reference read the chosen and
rejected responses of each comparison; a `PreferenceAlgorithm` plugin turns their summed log-probs into the loss.
Run by stage=rl when the configured algorithm is offline."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from framework.data import ListDataset, split_records
from framework.distributed import ValidationShare
from framework.errors import ConfigError, DataError
from framework.imitation import encode_demonstration
from framework.interfaces import (
    IGNORE_INDEX,
    ComparisonDataset,
    Example,
    Labeller,
    PreferenceAlgorithm,
    StageContext,
    StageResult,
    Task,
)
from framework.instantiate import instantiate_plugin
from framework.models import context_length, count_parameters, disable_dropout, load_causal_lm, no_cache
from framework.records import Demonstration, Ranking
from framework.stages.common import (build_trainer, data_shards, epoch_batches, export_causal_lm,
                                     bounded, log_interval, read_section)
from framework.stages.lm_module import TrainingModule
from framework.stages.reward import PolicySampler, read_comparisons, weights_fingerprint
from framework.stages.sft import collate_examples
from framework.tokenization import load_tokenizer


@dataclass(frozen=True)
class OfflineSettings:
    """`stage.offline`: how stage=rl trains an offline algorithm (DPO, IPO) on comparisons. `RLStage` reads it when
    it is built, so that a wrong value stops the run before any model is loaded, with the key to fix."""

    batch_size: int = bounded(16, at_least=1)          # pairs per step (per process)
    epochs: float = bounded(1.0, above=0, note="passes over the pairs: e.g. 1, or 0.5")
    max_length: int = bounded(256, at_least=2, note="tokens of prompt + response; a longer pair is dropped")
    val_fraction: float = bounded(0.1, at_least=0, below=1, note="unless the dataset has its own held-out set")
    checkpoint_every_n_steps: int = bounded(200, at_least=0, note="0: no checkpoint during training")

    @classmethod
    def from_config(cls, settings: Mapping | None) -> OfflineSettings:
        return read_section("stage.offline", cls, settings)


def encode_pairs(tokenizer, rankings: Sequence[Ranking], fmt: str, max_length: int) -> list[tuple[Example, Example]]:
    """(chosen, rejected) examples with the response-only label mask, for every pair a ranking implies."""
    pairs, dropped = [], 0
    for r in rankings:
        for better, worse in r.pairs():
            chosen, _ = encode_demonstration(tokenizer, Demonstration(prompt=r.prompt, response=r.responses[better]),
                                             fmt, max_length)
            rejected, _ = encode_demonstration(tokenizer, Demonstration(prompt=r.prompt, response=r.responses[worse]),
                                               fmt, max_length)
            if chosen is None or rejected is None:
                dropped += 1
                continue
            pairs.append((chosen, rejected))
    if dropped:
        warnings.warn(f"{dropped} pair(s) dropped: a response alone exceeds max_length={max_length}", stacklevel=2)
    return pairs


def collate_pairs(pairs: list[tuple[Example, Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """The chosen responses of the batch, then the rejected ones, in one right-padded batch (one forward each)."""
    return collate_examples([c for c, _ in pairs] + [r for _, r in pairs], pad_id)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean) over labelled positions of log p(label_t | prefix): logits[:, t] predict labels[:, t + 1]."""
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = (logp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


class PreferenceModule(TrainingModule):
    def __init__(self, policy: torch.nn.Module, reference: torch.nn.Module, algorithm: PreferenceAlgorithm,
                 optimizer: Mapping[str, Any], scheduler: Mapping[str, Any]):
        super().__init__(optimizer, scheduler)
        self.policy, self.algorithm = policy, algorithm
        self._reference = [reference]  # frozen, outside the module: never trained, checkpointed or put in train mode
        self.average = bool(algorithm.average_logprobs)
        self.val_loss, self.val_accuracy, self.val_margin = MeanMetric(), MeanMetric(), MeanMetric()

    def on_fit_start(self) -> None:
        self._reference[0].to(self.device)

    def on_validation_start(self) -> None:  # also the validation run before fit (on a GPU: not the CPU)
        super().on_validation_start()
        self._reference[0].to(self.device)

    def _logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **no_cache(model)).logits
        logps = sequence_logps(logits, batch["labels"], self.average)
        half = logps.size(0) // 2
        return logps[:half], logps[half:]

    def train_loss(self, batch):
        chosen, rejected = self._logps(self.policy, batch)
        with torch.no_grad():
            ref_chosen, ref_rejected = self._logps(self._reference[0], batch)
        return self.algorithm.loss(chosen, rejected, ref_chosen, ref_rejected)

    def throughput(self, batch):
        return "pairs", batch["input_ids"].size(0) // 2

    def validation_step(self, batch, batch_idx):
        loss, metrics = self.train_loss(batch)
        n = batch["input_ids"].size(0) // 2
        self.val_loss.update(loss, weight=n)
        self.val_accuracy.update(metrics["rewards/accuracies"], weight=n)
        self.val_margin.update(metrics["rewards/margins"], weight=n)
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)
        self.log("val/rewards/accuracies", self.val_accuracy, on_epoch=True)
        self.log("val/rewards/margins", self.val_margin, on_epoch=True)


def run_offline(stage, ctx: StageContext, algorithm: PreferenceAlgorithm, path: str,
                key: str = "policy.path") -> StageResult:
    """stage: the RLStage (its format, optimizer, scheduler and `offline`: an `OfflineSettings`); key: the setting
    that gave `path`, named in its errors."""
    cfg = ctx.cfg
    settings: OfflineSettings = stage.offline
    batch_size, epochs, max_length, val_fraction = (settings.batch_size, settings.epochs, settings.max_length,
                                                    settings.val_fraction)
    dataset = instantiate_plugin(cfg.dataset, "dataset", ComparisonDataset,
                                 fix=f"algo={type(algorithm).__name__} trains on comparisons: dataset=comparisons_jsonl "
                                     "dataset.paths=[...], or dataset=policy_comparisons labeller=synthetic")
    task = instantiate_plugin(cfg.task, "task", Task) if cfg.get("task") else None
    labeller = None
    if dataset.needs_policy:
        if not cfg.get("labeller"):
            raise ConfigError(f"{dataset.describe()}: needs a labeller to rank the samples: labeller=synthetic")
        labeller = instantiate_plugin(cfg.labeller, "labeller", Labeller)
    lm = load_causal_lm(str(path), key=key)  # first: its errors name the setting that gave the path
    tokenizer = load_tokenizer(path)
    n_ctx = context_length(lm)
    if n_ctx is not None and max_length > n_ctx:
        raise ConfigError(f"stage.offline.max_length={max_length} exceeds the policy's context length {n_ctx}")
    disable_dropout(lm)
    reference = copy.deepcopy(lm).eval().requires_grad_(False)
    sampler = PolicySampler(lm, tokenizer, stage.format, int(cfg.seed), Path(cfg.paths.cache_dir),
                            weights_fingerprint(path), context=n_ctx)
    rankings, heldout = read_comparisons(dataset, task, labeller, sampler if dataset.needs_policy else None,
                                         int(cfg.seed))
    train_r, val_r = split_records(rankings, val_fraction, seed=cfg.split_seed, heldout=heldout)
    train = encode_pairs(tokenizer, train_r, stage.format, max_length)
    val = encode_pairs(tokenizer, val_r, stage.format, max_length) if val_r else []
    if not train:
        raise DataError(f"{dataset.describe()}: no training pair fits in stage.offline.max_length={max_length}")
    collate = partial(collate_pairs, pad_id=tokenizer.pad_token_id)
    # whole batches only (a last partial one is dropped, a different one each epoch: the loader shuffles), unless a
    # rank's share of the pairs makes less than one batch; the steps count the batches one rank's loader yields
    world = data_shards(ctx)
    per_epoch, drop_last = epoch_batches(len(train), batch_size, world)
    train_loader = DataLoader(ListDataset(train), batch_size=batch_size, shuffle=True, collate_fn=collate,
                              drop_last=drop_last)
    val_loader = DataLoader(ListDataset(val), batch_size=batch_size, sampler=ValidationShare(len(val)),
                            collate_fn=collate) if val else None
    steps = max(1, math.ceil(epochs * per_epoch))
    print(f"[rlhf] {type(algorithm).__name__}: {len(train)} train / {len(val)} val pairs from {dataset.describe()}; "
          f"policy {count_parameters(lm) / 1e6:.2f} M parameters; {steps} steps of {batch_size} pairs "
          + (f"per process ({world} processes) " if world > 1 else "")
          + f"({epochs:g} epoch(s) of {per_epoch} batches)")
    module = PreferenceModule(lm, reference, algorithm, stage.optimizer, stage.scheduler)
    lm.train()
    trainer = build_trainer(ctx, callbacks=[], every_n_steps=settings.checkpoint_every_n_steps,
                            lengthen="raise stage.offline.epochs and pass ckpt_path=<this checkpoint> (resume=true "
                                     "refuses a changed stage.offline)",
                            overrides={"max_steps": steps, "limit_val_batches": 1.0 if val else 0,
                                       "log_every_n_steps": log_interval(cfg.trainer.get("log_every_n_steps"), steps)})
    if val_loader is not None and ctx.ckpt_path is None:
        trainer.validate(module, dataloaders=val_loader, verbose=False)
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ctx.ckpt_path)
    results = trainer.validate(module, dataloaders=val_loader, verbose=False) if val_loader is not None else []
    final = {k: float(v) for k, v in (results[0] if results else {}).items()}
    artifact_dir = ctx.output_dir / "model"
    if trainer.is_global_zero:
        export_causal_lm(lm, tokenizer, artifact_dir, 64)
        logged = ctx.run.log_dir(artifact_dir, "model", float(cfg.logger.get("log_model_max_mb", 200)))
        print(f"[rlhf] exported model + tokenizer to {artifact_dir}" + ("" if logged else " (path tagged)"))
        for k, v in final.items():
            print(f"[rlhf] {k} = {v:.4f}")
    return StageResult(artifact_dir=artifact_dir, metrics=final)
