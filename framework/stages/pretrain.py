"""Stage 1, generative pretraining: a causal LM learns next-token prediction on packed raw text."""

from __future__ import annotations

import math
from typing import Mapping

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from framework.data import hash_split, pack_token_stream
from framework.distributed import ValidationShare
from framework.errors import ConfigError, DataError
from framework.instantiate import instantiate_plugin
from framework.interfaces import Stage, StageContext, StageResult, TextDataset
from framework.models import context_length, count_parameters
from framework.stages.common import (
    SampleSettings,
    build_tokenizer_and_model,
    build_trainer,
    check_max_steps,
    check_optimizer_keys,
    check_stage_sizes,
    export_causal_lm,
    lm_loss,
    log_samples,
)
from framework.stages.lm_module import CausalLMModule


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
                 num_workers: int = 0, seed: int = 0, world_size: int = 1, val_batches: int | None = None):
        """world_size: the training processes, which share the train blocks (Lightning's distributed sampler).
        val_batches: validate on the first this many batches of the val blocks (None: all), over every process."""
        super().__init__()
        self.world_size, self.val_batches = world_size, val_batches
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
        # under DDP each process trains on its share of the blocks (Lightning's distributed sampler), and the loader
        # drops a last partial batch: a share smaller than a batch would train nothing, silently
        world = self.world_size
        for split, blocks in self.splits.items():
            need = self.batch_size if split == "train" else 1
            share = math.ceil(len(blocks) / world)
            if share < need:
                per = f" per process ({world} processes share {len(blocks)})" if world > 1 else ""
                raise DataError(
                    f"the {split} split packs into {share} block(s) of {self.seq_len} "
                    f"tokens{per}, fewer than {need}; use more text, a smaller stage.seq_len / stage.batch_size, or a "
                    "larger stage.val_fraction"
                )

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.splits["train"], batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, generator=gen)

    def val_dataloader(self) -> DataLoader:
        val = self.splits["val"]
        return DataLoader(val, batch_size=self.batch_size, sampler=ValidationShare(len(val), self.val_batches,
                                                                                   self.batch_size),
                          num_workers=self.num_workers)

    def token_counts(self) -> dict[str, int]:
        return {k: v.data.numel() for k, v in self.splits.items()}


class PretrainStage(Stage):
    """Wires dataset + tokenizer + model + loss plugins into Lightning, trains, exports a HF dir, samples."""

    def __init__(self, name: str = "pretrain", seq_len: int = 128, batch_size: int = 32, val_fraction: float = 0.02,
                 val_batches: int | None = 16, num_workers: int = 0, optimizer: Mapping | None = None,
                 scheduler: Mapping | None = None, checkpoint_every_n_steps: int = 100, samples: Mapping | None = None):
        self.name = name
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.val_batches, self.num_workers = val_batches, num_workers
        check_stage_sizes(val_fraction, batch_size, val_batches, seq_len=seq_len)
        self.optimizer = dict(optimizer or {"lr": 3e-3})
        self.scheduler = dict(scheduler or {})
        check_optimizer_keys(self.optimizer, self.scheduler)
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.samples = SampleSettings.from_config(samples)

    def load_corpus(self, cfg) -> tuple[list[str], list[str]]:
        dataset: TextDataset = instantiate_plugin(cfg.dataset, "dataset", TextDataset)
        docs = [t.text for t in dataset.texts()]
        if not docs:
            raise DataError(f"{dataset.describe()}: no documents with text; check dataset.* settings")
        train, val = hash_split(docs, self.val_fraction, seed=cfg.split_seed, key=lambda d: d)
        print(f"[rlhf] corpus: {dataset.describe()}: {len(docs)} documents -> {len(train)} train / {len(val)} val")
        return train, val

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.cfg
        check_max_steps(cfg.trainer.get("max_steps"))
        loss = lm_loss(cfg, self.name)
        train_texts, val_texts = self.load_corpus(cfg)
        tokenizer, model = build_tokenizer_and_model(cfg, train_texts)
        n_ctx = context_length(model)
        if n_ctx is not None and self.seq_len > n_ctx:
            raise ConfigError(f"stage.seq_len={self.seq_len} exceeds the model's context length {n_ctx}")
        n_params = count_parameters(model)
        print(f"[rlhf] model: {type(model).__name__}, {n_params / 1e6:.2f} M parameters; vocab {len(tokenizer)}")

        # stage.val_batches caps the validation set in its loader (ValidationShare), not per process
        trainer = build_trainer(ctx, callbacks=[], every_n_steps=self.checkpoint_every_n_steps, limit_val_batches=1.0)
        data = PackedTextDataModule(tokenizer, train_texts, val_texts, self.seq_len, self.batch_size,
                                    self.num_workers, seed=cfg.seed, world_size=trainer.world_size,
                                    val_batches=self.val_batches)
        data.setup()
        ctx.run.log_params({"data.train_tokens": str(data.token_counts()["train"]),
                            "data.val_tokens": str(data.token_counts()["val"]), "model.n_params": str(n_params)})
        module = CausalLMModule(model, loss, self.optimizer, self.scheduler)
        if ctx.ckpt_path is None:  # the starting point, logged as step 0, so "how far did val loss fall" is on record
            trainer.validate(module, datamodule=data, verbose=False)
        trainer.fit(module, datamodule=data, ckpt_path=ctx.ckpt_path)
        final = trainer.validate(module, datamodule=data, verbose=False)[0]

        artifact_dir = ctx.output_dir / "model"
        if trainer.is_global_zero:
            export_causal_lm(model, tokenizer, artifact_dir, self.samples.max_new_tokens)
            log_samples(ctx, model, tokenizer, self.samples)
            logged = ctx.run.log_dir(artifact_dir, "model", float(cfg.logger.get("log_model_max_mb", 200)))
            print(f"[rlhf] exported model + tokenizer to {artifact_dir}" + ("" if logged else " (too large to upload; path tagged)"))
        return StageResult(artifact_dir=artifact_dir, metrics={k: float(v) for k, v in final.items()})
