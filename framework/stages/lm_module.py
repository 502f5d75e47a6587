"""The LightningModule every language-model training stage shares: loss from the `loss` plugin, AdamW + warmup/
cosine, throughput, validation loss/perplexity/token accuracy, and an optional task evaluator."""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Callable, Mapping

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from framework.interfaces import IGNORE_INDEX, Loss
from framework.stages.common import adamw_param_groups, warmup_cosine


class CausalLMModule(pl.LightningModule):
    """Logs train/loss, train/tokens_per_s, lr per step; val/loss, val/perplexity, val/token_accuracy per validation.

    evaluator: called with the model at the end of each validation (rank 0 only, dropout off); returns metrics to log
    (e.g. greedy-decoding task scores).
    """

    def __init__(self, model: torch.nn.Module, loss: Loss, optimizer: Mapping[str, Any], scheduler: Mapping[str, Any],
                 evaluator: Callable[[torch.nn.Module], dict[str, float]] | None = None):
        super().__init__()
        self.model = model
        self.loss_fn = loss
        self.optimizer_cfg = dict(optimizer)
        self.scheduler_cfg = dict(scheduler)
        self.evaluator = evaluator
        self.val_loss = MeanMetric()
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self.val_correct = MeanMetric()
        self._last_step_end: float | None = None

    def forward(self, batch: Mapping[str, torch.Tensor]):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.loss_fn(self(batch), batch)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in metrics.items():
            self.log(f"train/{name}", value)
        self.log("lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_step_end is not None:  # wall time between batch ends: data + forward + backward + step
            mask = batch.get("attention_mask")
            tokens = (int(mask.sum()) if mask is not None else batch["input_ids"].numel()) * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / max(now - self._last_step_end, 1e-9), prog_bar=True)
        self._last_step_end = now

    def on_validation_start(self) -> None:
        self._last_step_end = None  # validation time is not a training step

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        outputs = self(batch)
        loss, metrics = self.loss_fn(outputs, batch)
        self.val_loss.update(loss, weight=metrics.get("tokens", torch.tensor(1.0)))
        logits, target = outputs.logits[:, :-1].float(), batch["labels"][:, 1:]
        self.val_perplexity.update(logits, target)
        counted = target != IGNORE_INDEX
        if counted.any():
            self.val_correct.update((logits.argmax(-1) == target)[counted].float())
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)
        self.log("val/perplexity", self.val_perplexity, on_epoch=True)
        self.log("val/token_accuracy", self.val_correct, on_epoch=True)

    def on_validation_epoch_end(self) -> None:
        if self.evaluator is None or self.trainer.sanity_checking:
            return
        metrics = self.evaluator(self.model) if self.trainer.is_global_zero else {}
        for name, value in metrics.items():
            self.log(name, float(value), rank_zero_only=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            adamw_param_groups(self.model, self.optimizer_cfg.get("weight_decay", 0.0)),
            lr=self.optimizer_cfg["lr"],
            betas=tuple(self.optimizer_cfg.get("betas", (0.9, 0.95))),
            eps=self.optimizer_cfg.get("eps", 1e-8),
        )
        total = int(self.trainer.estimated_stepping_batches)
        schedule = partial(warmup_cosine, warmup_steps=int(self.scheduler_cfg.get("warmup_steps", 0)),
                           total_steps=total, min_ratio=float(self.scheduler_cfg.get("min_lr_ratio", 0.1)))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
