"""The LightningModule every language-model training stage shares: loss from the `loss` plugin, AdamW + warmup/
cosine, throughput, validation loss/perplexity/token accuracy, and an optional task evaluator."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import pytorch_lightning as pl
import torch
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from framework.distributed import failing_together
from framework.interfaces import IGNORE_INDEX, Loss
from framework.models import no_cache
from framework.stages.common import adamw_warmup_cosine


class TrainingModule(pl.LightningModule):
    """What every training stage's module shares: the loss and its metrics under `train/`, `lr`, a throughput under
    `train/<unit>_per_s` (wall time between batch ends: data + forward + backward + step), and AdamW with warmup and
    cosine decay over all of the module's parameters. Subclasses give `train_loss` and `throughput`."""

    def __init__(self, optimizer: Mapping[str, Any], scheduler: Mapping[str, Any]):
        super().__init__()
        self.optimizer_cfg = dict(optimizer)
        self.scheduler_cfg = dict(scheduler)
        self._last_step_end: float | None = None

    def train_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def throughput(self, batch: dict[str, torch.Tensor]) -> tuple[str, int]:
        """(unit, how many of it this rank's batch holds)."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.train_loss(batch)
        # sync_dist: under DDP the mean over every process's batch (nothing to do in one process)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        for name, value in metrics.items():
            self.log(f"train/{name}", value, sync_dist=True)
        self.log("lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_step_end is not None:
            unit, count = self.throughput(batch)
            # each process's own rate, summed over the processes (their batches hold different numbers of tokens)
            self.log(f"train/{unit}_per_s", count / max(now - self._last_step_end, 1e-9), prog_bar=True,
                     sync_dist=True, reduce_fx="sum")
        self._last_step_end = now

    def on_validation_start(self) -> None:
        self._last_step_end = None  # validation time is not a training step

    def configure_optimizers(self):
        # the Trainer clips (automatic optimisation): its precision and clip value decide the AdamW kernel
        return adamw_warmup_cosine(self, int(self.trainer.estimated_stepping_batches), self.optimizer_cfg,
                                   self.scheduler_cfg, str(self.trainer.precision), self.trainer.gradient_clip_val)


class CausalLMModule(TrainingModule):
    """Logs train/loss, train/tokens_per_s, lr per step; val/loss, val/perplexity, val/token_accuracy per validation.

    evaluator: called with the model at the end of each validation (rank 0 only, dropout off); returns metrics to log
    (e.g. greedy-decoding task scores).
    """

    def __init__(self, model: torch.nn.Module, loss: Loss, optimizer: Mapping[str, Any], scheduler: Mapping[str, Any],
                 evaluator: Callable[[torch.nn.Module], dict[str, float]] | None = None):
        super().__init__(optimizer, scheduler)
        self.model = model
        self.loss_fn = loss
        self.evaluator = evaluator
        self.val_loss = MeanMetric()
        self.val_perplexity = Perplexity(ignore_index=IGNORE_INDEX)
        self.val_correct = MeanMetric()

    def forward(self, batch: Mapping[str, torch.Tensor]):
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                          **no_cache(self.model))

    def train_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss_fn(self(batch), batch)

    def throughput(self, batch: dict[str, torch.Tensor]) -> tuple[str, int]:
        mask = batch.get("attention_mask")
        return "tokens", int(mask.sum()) if mask is not None else batch["input_ids"].numel()

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
        metrics = {}
        # on rank 0; under DDP the others wait for it here, so that an error in it stops them too
        with failing_together(f"in the task evaluation at step {self.trainer.global_step}"):
            if self.trainer.is_global_zero:
                metrics = self.evaluator(self.model)
        for name, value in metrics.items():
            self.log(name, float(value), rank_zero_only=True)
