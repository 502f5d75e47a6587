"""Stage 1, generative pretraining: a causal LM learns next-token prediction on packed raw text."""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from framework.data import hash_split, pack_token_stream
from framework.errors import ConfigError, DataError
from framework.instantiate import instantiate_plugin
from framework.interfaces import Loss, Stage, StageContext, StageResult, TextDataset
from framework.models import context_length, count_parameters
from framework.rollout import HFGenerator, SamplingSettings
from framework.stages.common import (
    adamw_param_groups,
    build_tokenizer_and_model,
    build_trainer,
    export_causal_lm,
    warmup_cosine,
)
from framework.tokenization import stop_token_ids


class PackedBlocks(Dataset):
    """Fixed-length token blocks; each item is {"input_ids": [seq_len], "labels": [seq_len]}."""

    def __init__(self, blocks: list[list[int]]):
        self.data = torch.tensor(blocks, dtype=torch.long) if blocks else torch.empty(0, 0, dtype=torch.long)

    def __len__(self) -> int:
        return self.data.size(0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[i]
        return {"input_ids": ids, "labels": ids}


class PackedTextDataModule(pl.LightningDataModule):
    """Tokenises train/val documents once and packs them into blocks of `seq_len` tokens."""

    def __init__(self, tokenizer, train_texts: list[str], val_texts: list[str], seq_len: int, batch_size: int,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.tokenizer = tokenizer
        self.texts = {"train": train_texts, "val": val_texts}
        self.seq_len, self.batch_size, self.num_workers, self.seed = seq_len, batch_size, num_workers, seed
        self.splits: dict[str, PackedBlocks] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split, texts in self.texts.items():
            ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
            self.splits[split] = PackedBlocks(pack_token_stream(ids, self.tokenizer.eos_token_id, self.seq_len))
        for split, blocks in self.splits.items():
            need = self.batch_size if split == "train" else 1
            if len(blocks) < need:
                raise DataError(
                    f"the {split} split packs into {len(blocks)} block(s) of {self.seq_len} tokens, fewer than {need}; "
                    "use more text, a smaller stage.seq_len / stage.batch_size, or a larger stage.val_fraction"
                )

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], batch_size=self.batch_size, num_workers=self.num_workers)

    def token_counts(self) -> dict[str, int]:
        return {k: v.data.numel() for k, v in self.splits.items()}


class PretrainModule(pl.LightningModule):
    """Next-token prediction. Logs train/loss, train/tokens_per_s, lr per step; val/loss, val/perplexity."""

    def __init__(self, model: torch.nn.Module, loss: Loss, optimizer: Mapping[str, Any], scheduler: Mapping[str, Any]):
        super().__init__()
        self.model = model
        self.loss_fn = loss
        self.optimizer_cfg = dict(optimizer)
        self.scheduler_cfg = dict(scheduler)
        self.val_loss = MeanMetric()
        self.val_perplexity = Perplexity(ignore_index=-100)
        self._last_step_end: float | None = None

    def forward(self, input_ids: torch.Tensor):
        return self.model(input_ids=input_ids)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.loss_fn(self(batch["input_ids"]), batch)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in metrics.items():
            self.log(f"train/{name}", value)
        self.log("lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last_step_end is not None:  # wall time between batch ends: data + forward + backward + step
            tokens = batch["input_ids"].numel() * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / max(now - self._last_step_end, 1e-9), prog_bar=True)
        self._last_step_end = now

    def on_validation_start(self) -> None:
        self._last_step_end = None  # do not count validation time as a training step

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        outputs = self(batch["input_ids"])
        loss, metrics = self.loss_fn(outputs, batch)
        self.val_loss.update(loss, weight=metrics.get("tokens", torch.tensor(1.0)))
        self.val_perplexity.update(outputs.logits[:, :-1].float(), batch["labels"][:, 1:])
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)
        self.log("val/perplexity", self.val_perplexity, on_epoch=True)

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


class PretrainStage(Stage):
    """Wires dataset + tokenizer + model + loss plugins into Lightning, trains, exports a HF dir, samples."""

    def __init__(self, name: str = "pretrain", seq_len: int = 128, batch_size: int = 32, val_fraction: float = 0.02,
                 val_batches: int | None = 16, num_workers: int = 0, optimizer: Mapping | None = None,
                 scheduler: Mapping | None = None, checkpoint_every_n_steps: int = 100, samples: Mapping | None = None):
        self.name = name
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.val_batches, self.num_workers = val_batches, num_workers
        self.optimizer = dict(optimizer or {"lr": 3e-3})
        self.scheduler = dict(scheduler or {})
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.samples = dict(samples or {})

    def load_corpus(self, cfg) -> tuple[list[str], list[str]]:
        dataset: TextDataset = instantiate_plugin(cfg.dataset, "dataset", TextDataset)
        docs = [t.text for t in dataset.texts()]
        if not docs:
            raise DataError(f"{dataset.describe()}: no documents with text; check dataset.* settings")
        train, val = hash_split(docs, self.val_fraction, seed=cfg.seed, key=lambda d: d)
        print(f"[rlhf] corpus: {dataset.describe()}: {len(docs)} documents -> {len(train)} train / {len(val)} val")
        return train, val

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.cfg
        train_texts, val_texts = self.load_corpus(cfg)
        tokenizer, model = build_tokenizer_and_model(cfg, train_texts)
        n_ctx = context_length(model)
        if n_ctx is not None and self.seq_len > n_ctx:
            raise ConfigError(f"stage.seq_len={self.seq_len} exceeds the model's context length {n_ctx}")
        n_params = count_parameters(model)
        print(f"[rlhf] model: {type(model).__name__}, {n_params / 1e6:.2f} M parameters; vocab {len(tokenizer)}")

        data = PackedTextDataModule(tokenizer, train_texts, val_texts, self.seq_len, self.batch_size,
                                    self.num_workers, seed=cfg.seed)
        data.setup()
        ctx.run.log_params({"data.train_tokens": str(data.token_counts()["train"]),
                            "data.val_tokens": str(data.token_counts()["val"]), "model.n_params": str(n_params)})
        module = PretrainModule(model, instantiate_plugin(cfg.loss, "loss", Loss), self.optimizer, self.scheduler)
        trainer = build_trainer(ctx, callbacks=[], every_n_steps=self.checkpoint_every_n_steps,
                                limit_val_batches=self.val_batches or 1.0)
        if ctx.ckpt_path is None:  # the starting point, logged as step 0, so "how far did val loss fall" is on record
            trainer.validate(module, datamodule=data, verbose=False)
        trainer.fit(module, datamodule=data, ckpt_path=ctx.ckpt_path)
        final = trainer.validate(module, datamodule=data, verbose=False)[0]

        artifact_dir = ctx.output_dir / "model"
        if trainer.is_global_zero:
            export_causal_lm(model, tokenizer, artifact_dir, self.samples.get("max_new_tokens", 64))
            self.log_samples(ctx, model, tokenizer)
            logged = ctx.run.log_dir(artifact_dir, "model", float(cfg.logger.get("log_model_max_mb", 200)))
            print(f"[rlhf] exported model + tokenizer to {artifact_dir}" + ("" if logged else " (too large to upload; path tagged)"))
        return StageResult(artifact_dir=artifact_dir, metrics={k: float(v) for k, v in final.items()})

    def log_samples(self, ctx: StageContext, model, tokenizer) -> None:
        prompts = list(self.samples.get("prompts", []))
        if not prompts:
            return
        settings = SamplingSettings(max_new_tokens=int(self.samples.get("max_new_tokens", 40)),
                                    temperature=float(self.samples.get("temperature", 1.0)),
                                    top_p=float(self.samples.get("top_p", 1.0)))
        torch.manual_seed(ctx.cfg.seed)
        completions = HFGenerator(model, tokenizer, stop_token_ids(tokenizer)).generate_text(prompts, settings)
        print("[rlhf] samples:")
        for p, c in zip(prompts, completions):
            print(f"  {p!r} -> {c!r}")
        ctx.run.log_table({"prompt": prompts, "completion": completions}, "samples.json")
