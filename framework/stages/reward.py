"""Stage 3, reward learning from preferences: an LM trunk + a reward head plugin trained with a preference loss
plugin on pairwise comparisons or K-wise rankings (from files, or made here by sampling the policy and asking a
labeller plugin), then normalised on policy samples and exported."""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.classification import BinaryCalibrationError
from torchmetrics.regression import SpearmanCorrCoef

from framework.distributed import ValidationShare, max_over_processes
from framework.data import LengthGroupedSampler, ListDataset, split_records
from framework.errors import ConfigError, DataError
from framework.imitation import PromptEncoder, check_format, stop_token_id
from framework.instantiate import instantiate_plugin
from framework.interfaces import (
    ComparisonContext,
    ComparisonDataset,
    Labeller,
    Loss,
    RewardHead,
    Stage,
    StageContext,
    StageResult,
    Task,
)
from framework.records import Prompt, Ranking
from framework.reward import RewardModel, encode_scored, export_reward_model, pad_right, score_texts
from framework.rollout import HFGenerator, SamplingSettings
from framework.stages.common import (bounded, build_tokenizer_and_model, build_trainer, check_max_steps,
                                     check_optimizer_keys, check_stage_sizes, data_shards, epoch_batches, log_interval,
                                     read_section)
from framework.stages.lm_module import TrainingModule
from framework.tokenization import load_tokenizer
from framework.models import CausalLMFactory, context_length, count_parameters, disable_dropout, resolve_model_path


@dataclass
class Group:
    """One ranking, encoded: token ids of its responses in preference order (best first)."""

    input_ids: list[list[int]]
    gold: list[float] | None
    margin: float | None


def encode_rankings(tokenizer, rankings: Sequence[Ranking], fmt: str, max_length: int) -> list[Group]:
    """Encode every response with its prompt (the SFT formatting); a ranking loses a response that does not fit
    even with its prompt cut from the left, and is dropped when fewer than two are left (counted warnings)."""
    groups, shortened, dropped = [], 0, 0
    for r in rankings:
        ranked = [(encode_scored(tokenizer, r.prompt, r.responses[i], fmt, max_length),
                   None if r.gold is None else float(r.gold[i])) for i in r.order]
        kept = [(ids, g) for ids, g in ranked if ids is not None]
        if len(kept) < 2:
            dropped += 1
            continue
        shortened += len(kept) < len(ranked)
        groups.append(Group([ids for ids, _ in kept], None if r.gold is None else [g for _, g in kept],
                            r.margin if len(kept) == len(ranked) else None))
    if shortened:
        warnings.warn(f"{shortened} ranking(s) lost responses longer than stage.max_length={max_length}", stacklevel=2)
    if dropped:
        warnings.warn(f"{dropped} comparison(s) dropped: fewer than two responses fit in stage.max_length="
                      f"{max_length}; raise it (and the model's context) to keep them", stacklevel=2)
    return groups


def collate_groups(groups: list[Group], pad_id: int) -> dict[str, torch.Tensor]:
    """Flattened responses (right-padded) + the group structure: rank_mask [G, K], margin [G], gold [G, K]."""
    ids, mask = pad_right([row for g in groups for row in g.input_ids], pad_id)
    sizes = torch.tensor([len(g.input_ids) for g in groups])
    k = int(sizes.max())
    rank_mask = torch.arange(k).unsqueeze(0) < sizes.unsqueeze(1)
    margin = torch.tensor([float("nan") if g.margin is None else g.margin for g in groups])
    gold = torch.full((len(groups), k), float("nan"))
    for i, g in enumerate(groups):
        if g.gold is not None:
            gold[i, : len(g.gold)] = torch.tensor(g.gold)
    return {"input_ids": ids, "attention_mask": mask, "rank_mask": rank_mask, "margin": margin, "gold": gold}


def ranked(values: torch.Tensor, rank_mask: torch.Tensor) -> torch.Tensor:
    """Per-response values [N, M] -> [G, K, M] in preference order (zeros where a group has fewer responses)."""
    out = values.new_zeros(*rank_mask.shape, values.size(-1))
    out[rank_mask] = values
    return out


class RewardModule(TrainingModule):
    """Trains a RewardModel with a preference loss; validation metrics (torchmetrics, synced across ranks):
    loss, pairwise accuracy, agreement with gold preferences and Spearman correlation with gold scores (when the
    labels came from a gold), calibration error of sigmoid(r_a - r_b), reward mean/std of chosen and rejected
    (best and worst of a ranking), and the spread of ensemble members."""

    def __init__(self, rm: RewardModel, loss: Loss, optimizer: Mapping[str, Any], scheduler: Mapping[str, Any]):
        super().__init__(optimizer, scheduler)
        self.rm, self.loss_fn = rm, loss
        self.val_loss, self.val_accuracy, self.val_gold_accuracy = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_spearman = SpearmanCorrCoef()
        self.val_calibration = BinaryCalibrationError(n_bins=10)
        self.val_chosen, self.val_rejected, self.val_member_std = CatMetric(), CatMetric(), MeanMetric()
        self._has_gold = False

    def member_loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The loss of every member on its own rewards; returns (loss, metrics, ranked rewards [G, K, M])."""
        values = self.rm(batch["input_ids"], batch["attention_mask"])
        r = ranked(values, batch["rank_mask"])
        g, k, m = r.shape
        flat = r.permute(0, 2, 1).reshape(g * m, k)
        loss, metrics = self.loss_fn(flat, {"rank_mask": batch["rank_mask"].repeat_interleave(m, 0),
                                            "margin": batch["margin"].repeat_interleave(m, 0)})
        return loss, metrics, r

    def train_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.member_loss(batch)[:2]

    def throughput(self, batch: dict[str, torch.Tensor]) -> tuple[str, int]:
        mask = batch["rank_mask"]
        return "pairs", int(torch.triu(mask.unsqueeze(2) & mask.unsqueeze(1), 1).sum())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, _, r = self.member_loss(batch)
        mask = batch["rank_mask"]
        self.val_loss.update(loss, weight=mask.size(0))
        mean = r.float().mean(-1)  # [G, K]
        a, b = torch.triu_indices(mask.size(1), mask.size(1), offset=1, device=mask.device)
        valid = mask[:, a] & mask[:, b]
        diff = (mean[:, a] - mean[:, b])[valid]
        self.val_accuracy.update((diff > 0).float())
        # calibration of P(a > b) = sigmoid(r_a - r_b), every pair presented both ways round (labels 1 and 0), so
        # that both classes are there and the error does not depend on which pairs share a batch or a process
        right_way = torch.ones_like(diff, dtype=torch.long)
        self.val_calibration.update(torch.sigmoid(torch.cat([diff, -diff])), torch.cat([right_way, 0 * right_way]))
        last = mask.sum(1) - 1
        rows = torch.arange(mask.size(0), device=mask.device)
        self.val_chosen.update(mean[:, 0])
        self.val_rejected.update(mean[rows, last])
        if r.size(-1) > 1:
            self.val_member_std.update(r.float().std(-1)[mask])
        gold = batch["gold"].to(mean)
        has_gold = ~torch.isnan(gold) & mask
        if has_gold.any():
            self._has_gold = True
            self.val_spearman.update(mean[has_gold], gold[has_gold])
            gold_diff = (gold[:, a] - gold[:, b])[valid]
            decided = ~torch.isnan(gold_diff) & (gold_diff != 0)
            if decided.any():
                self.val_gold_accuracy.update(((diff * gold_diff.sign())[decided] > 0).float())

    def on_validation_epoch_end(self) -> None:
        metrics = {"val/loss": self.val_loss.compute(), "val/accuracy": self.val_accuracy.compute(),
                   "val/calibration_error": self.val_calibration.compute()}
        chosen, rejected = self.val_chosen.compute(), self.val_rejected.compute()
        metrics.update({"val/reward_chosen_mean": chosen.mean(), "val/reward_chosen_std": chosen.std(),
                        "val/reward_rejected_mean": rejected.mean(), "val/reward_rejected_std": rejected.std()})
        # compute() is a collective under DDP: whether to call it is decided over every process's share (one
        # whose share has no gold, or no decided gold pair, would otherwise skip it while the others wait)
        members, gold, decided = (bool(v) for v in max_over_processes(torch.tensor(
            [float(self.val_member_std.update_count > 0), float(self._has_gold),
             float(self.val_gold_accuracy.update_count > 0)])).tolist())
        if members:
            metrics["val/reward_std_members"] = self.val_member_std.compute()
        if gold:
            metrics["val/spearman_gold"] = self.val_spearman.compute()
            if decided:
                metrics["val/gold_accuracy"] = self.val_gold_accuracy.compute()
        for name, value in metrics.items():
            # torchmetrics' compute() already covers every process's share, so the value is the same on each:
            # sync_dist only tells Lightning so (it warned about every key under DDP), averaging equal values
            self.log(name, value.float(), prog_bar=name in ("val/loss", "val/accuracy"), sync_dist=True)
        for metric in (self.val_loss, self.val_accuracy, self.val_gold_accuracy, self.val_spearman,
                       self.val_calibration, self.val_chosen, self.val_rejected, self.val_member_std):
            metric.reset()


class ComparisonDataModule(pl.LightningDataModule):
    """group_by_length: batches of comparisons of similar length (less padding), else a plain shuffle.
    drop_last: drop a last partial batch (the stage decides it for one process's share, `epoch_batches`; by default
    as for one process)."""

    def __init__(self, train: list[Group], val: list[Group], batch_size: int, pad_id: int, num_workers: int = 0,
                 group_by_length: bool = True, seed: int = 0, drop_last: bool | None = None, shards: int = 1):
        super().__init__()
        self.train, self.val, self.batch_size, self.shards = train, val, batch_size, shards
        self.collate = partial(collate_groups, pad_id=pad_id)
        self.num_workers, self.group_by_length, self.seed = num_workers, group_by_length, seed
        self.drop_last = epoch_batches(len(train), batch_size)[1] if drop_last is None else drop_last

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.group_by_length:
            # under DDP Lightning deals a custom sampler's order out round-robin (DistributedSamplerWrapper, no
            # shuffle), so groups of batch_size x shares give every process a batch of similar lengths from each
            sampler = LengthGroupedSampler([sum(len(r) for r in g.input_ids) for g in self.train],
                                           self.batch_size * self.shards, self.seed, epoch_of=self._epoch)
        return DataLoader(ListDataset(self.train), batch_size=self.batch_size, shuffle=sampler is None,
                          sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers,
                          drop_last=self.drop_last)

    def _epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ListDataset(self.val), batch_size=self.batch_size, sampler=ValidationShare(len(self.val)),
                          collate_fn=self.collate, num_workers=self.num_workers)


def read_comparisons(dataset: ComparisonDataset, task: Task | None, labeller: Labeller | None, sampler,
                     seed: int) -> tuple[list[Ranking], list[Ranking] | None]:
    """(comparisons, the dataset's own held-out set or None). sampler: the policy sampler, for datasets that
    sample the policy (None for files)."""
    cctx = ComparisonContext(sample=sampler or _no_sampling, task=task, labeller=labeller, seed=seed)
    rankings = list(dataset.comparisons(cctx))
    own = dataset.validation(cctx)
    if not rankings:
        raise DataError(f"{dataset.describe()}: no comparisons")
    return rankings, None if own is None else list(own)


def weights_fingerprint(path: str | None) -> str | None:
    """Identity of a saved model's weights (path + size + mtime of each weights file), for caching its samples."""
    if not path or not Path(path).is_dir():
        return None
    files = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin"))
    if not files:
        return None
    return json.dumps([str(Path(path).resolve())] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files])


class PolicySampler:
    """`sample(prompts, k, max_new_tokens, temperature)` from the policy (full distribution, batched), cached on disk
    when the policy is a saved model (the same samples serve every run of a sweep over labels, noise, heads or
    losses); stage=eval draws its N samples per prompt with it too."""

    def __init__(self, model, tokenizer, fmt: str, seed: int, cache_dir: Path | None, fingerprint: str | None,
                 context: int | None = None, batch_size: int = 64):
        self.model, self.tokenizer, self.fmt, self.seed, self.context = model, tokenizer, fmt, seed, context
        self.cache_dir = cache_dir if fingerprint else None
        self.fingerprint, self.batch_size = fingerprint, batch_size
        self.stop_id = stop_token_id(tokenizer, fmt)

    @classmethod
    def from_dir(cls, path: str, fmt: str, seed: int, cache_dir: Path | None, batch_size: int = 64,
                 key: str = "model.path") -> "PolicySampler":
        """A sampler of the saved model at `path` with its own tokenizer, in eval mode (cached when cache_dir). key:
        the setting that gave `path`, named when it is no model directory."""
        path = resolve_model_path(path, key=key)
        tokenizer = load_tokenizer(path)
        lm = CausalLMFactory(path=str(path)).build(tokenizer).eval()  # embeddings resized to the tokenizer if needed
        return cls(lm, tokenizer, fmt, seed, cache_dir, weights_fingerprint(path), context_length(lm), batch_size)

    def __call__(self, prompts: Sequence[Prompt], k: int, max_new_tokens: int = 48,
                 temperature: float = 1.0) -> list[list[str]]:
        key = hashlib.sha256(json.dumps([self.fingerprint, self.fmt, self.seed, k, max_new_tokens, temperature,
                                         [p.text for p in prompts]]).encode()).hexdigest()[:24]
        cache = self.cache_dir / "policy_samples" / f"{key}.json" if self.cache_dir else None
        if cache is not None and cache.is_file():
            print(f"[rlhf] policy samples: {len(prompts)} x {k} from cache {cache}")
            return json.loads(cache.read_text())
        started = time.perf_counter()
        gen = HFGenerator(self.model, self.tokenizer, [self.stop_id])
        settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature)  # top_k 0, top_p 1
        encoder = PromptEncoder(self.tokenizer, self.fmt, self.context, max_new_tokens)
        encoded = [encoder(p.text) for p in prompts]
        if encoder.truncated:
            warnings.warn(f"{encoder.truncated} prompt(s) longer than {encoder.room} tokens (context {self.context} - "
                          f"max_new_tokens {max_new_tokens}) were cut from the left for sampling", stacklevel=2)
        flat = [ids for ids in encoded for _ in range(k)]
        texts: list[str] = []
        # seeded, and on a forked RNG: drawing the samples (or reading them from the cache) leaves the run's own
        # random stream untouched, so a cache hit and a cache miss train the same model
        param = next(self.model.parameters())
        with torch.random.fork_rng(devices=[param.device] if param.is_cuda else []):
            torch.manual_seed(self.seed)
            for start in range(0, len(flat), self.batch_size):
                out = gen.generate_ids(flat[start : start + self.batch_size], settings)
                texts.extend(t.strip() for t in self.tokenizer.batch_decode(out.response_ids, skip_special_tokens=True))
        result = [texts[i * k : (i + 1) * k] for i in range(len(prompts))]
        print(f"[rlhf] policy samples: {len(prompts)} x {k} in {time.perf_counter() - started:.1f}s")
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(result))
            tmp.replace(cache)
        return result


@dataclass(frozen=True)
class NormalizeSettings:
    """`stage.normalize` of reward_model: after training, a gain and bias so that the rewards of `samples` policy
    samples have mean `target_mean` and std `target_std` (RLHF_REFERENCE 1.2 item 3)."""

    samples: int = bounded(256, at_least=0, note="0: no normalisation")
    max_new_tokens: int = bounded(48, at_least=1)
    temperature: float = bounded(1.0, above=0)
    target_mean: float = 0.0
    target_std: float = bounded(1.0, above=0)

    @classmethod
    def from_config(cls, settings: Mapping | None) -> NormalizeSettings:
        return read_section("stage.normalize", cls, settings)


class RewardModelStage(Stage):
    def __init__(self, name: str = "reward_model", format: str = "chat", max_length: int = 256, batch_size: int = 16,
                 epochs: float | None = None, val_fraction: float = 0.1, num_workers: int = 0,
                 optimizer: Mapping | None = None, scheduler: Mapping | None = None, checkpoint_every_n_steps: int = 200,
                 normalize: Mapping | None = None, disable_dropout: bool = True, group_by_length: bool = True,
                 policy_path: str | None = None):
        check_format(format)
        if policy_path:  # checked before any work, with the key to fix
            resolve_model_path(str(policy_path), key="stage.policy_path")
        self.policy_path = policy_path
        self.disable_dropout, self.group_by_length = disable_dropout, group_by_length
        self.name, self.format, self.max_length = name, format, max_length
        self.batch_size, self.epochs, self.val_fraction, self.num_workers = batch_size, epochs, val_fraction, num_workers
        # the sizes, before any work: the stage samples policy replies (minutes) before it knows its step count
        check_stage_sizes(val_fraction, batch_size, max_length=max_length)
        if epochs is not None and not epochs > 0:
            raise ConfigError(f"stage.epochs={epochs} must be > 0 (e.g. 1, or 0.5; null: trainer.max_steps)")
        self.optimizer = dict(optimizer or {"lr": 5e-5})
        self.scheduler = dict(scheduler or {})
        check_optimizer_keys(self.optimizer, self.scheduler)
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.normalize = NormalizeSettings.from_config(normalize)

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.cfg
        if self.epochs is None:  # sized by trainer.max_steps: check it before sampling and labelling (minutes)
            check_max_steps(cfg.trainer.get("max_steps"))
        loss: Loss = instantiate_plugin(cfg.loss, "loss", Loss)
        if loss.kind != "preference":
            raise ConfigError(f"loss._target_={cfg.loss._target_} is a {loss.kind!r} loss; the reward_model stage "
                              "trains on preferences: loss=bradley_terry | margin | kwise")
        head: RewardHead = instantiate_plugin(cfg.reward_head, "reward_head", RewardHead)
        dataset: ComparisonDataset = instantiate_plugin(cfg.dataset, "dataset", ComparisonDataset)
        task: Task | None = instantiate_plugin(cfg.task, "task", Task) if cfg.get("task") else None
        labeller: Labeller | None = None
        if dataset.needs_policy:
            if not cfg.model.get("path"):
                raise ConfigError(f"{dataset.describe()}: the reward model's trunk comes from model.path=<an SFT or "
                                  "pretrained model dir>" + ("" if self.policy_path else "; it is also the policy "
                                  "whose replies are compared unless stage.policy_path=<dir> names another"))
            if not cfg.get("labeller"):
                raise ConfigError(f"{dataset.describe()}: needs a labeller to rank the samples: labeller=synthetic")
            labeller = instantiate_plugin(cfg.labeller, "labeller", Labeller)

        rankings: list[Ranking] = []
        heldout: list[Ranking] | None = None
        if not dataset.needs_policy:  # a file: read it first, a trained tokenizer needs its text
            rankings, heldout = read_comparisons(dataset, task, None, None, int(cfg.seed))
        tokenizer, lm = build_tokenizer_and_model(cfg, [r.text() for r in rankings])
        n_ctx = context_length(lm)
        if n_ctx is not None and self.max_length > n_ctx:
            raise ConfigError(f"stage.max_length={self.max_length} exceeds the model's context length {n_ctx}")
        if self.policy_path:  # another model's replies (e.g. a trunk larger than the policy it will judge)
            sampler = PolicySampler.from_dir(self.policy_path, self.format, int(cfg.seed), Path(cfg.paths.cache_dir))
            print(f"[rlhf] policy samples come from stage.policy_path={self.policy_path} "
                  f"({count_parameters(sampler.model) / 1e6:.2f} M parameters)")
        else:
            sampler = PolicySampler(lm, tokenizer, self.format, int(cfg.seed), Path(cfg.paths.cache_dir),
                                    weights_fingerprint(cfg.model.get("path")), context=n_ctx)
        if dataset.needs_policy:
            rankings, heldout = read_comparisons(dataset, task, labeller, sampler, int(cfg.seed))
            skipped = getattr(dataset, "skipped", 0)
            print(f"[rlhf] comparisons: {len(rankings)} labelled" + (f" ({skipped} prompts skipped: all their samples "
                                                                    "were identical)" if skipped else ""))

        # the dataset's own held-out set when it has one: then every comparison of `comparisons()` trains
        train_r, val_r = split_records(rankings, self.val_fraction, seed=cfg.split_seed, heldout=heldout)
        train = encode_rankings(tokenizer, train_r, self.format, self.max_length)
        val = encode_rankings(tokenizer, val_r, self.format, self.max_length) if val_r else []
        if not train:
            raise DataError(f"{dataset.describe()}: no training comparison fits in stage.max_length={self.max_length}")
        pairs = sum(len(r.pairs()) for r in train_r)
        # the batches one rank's loader yields: whole ones only (it drops a last partial one), unless the rank's
        # share makes less than one
        world = data_shards(ctx)
        steps_per_epoch, drop_last = epoch_batches(len(train), self.batch_size, world)
        max_steps = int(cfg.trainer.get("max_steps") or 0)
        if self.epochs is not None:
            max_steps = max(1, math.ceil(self.epochs * steps_per_epoch))
        print(f"[rlhf] comparisons: {dataset.describe()}: {len(train)} train ({pairs} pairs) / {len(val)} val; "
              f"{max_steps} steps = {max_steps / steps_per_epoch:.2f} epochs of {steps_per_epoch} at batch "
              f"{self.batch_size}" + (f" per process ({world} processes)" if world > 1 else ""))

        norm_prompts = self._normalization_prompts(task if dataset.needs_policy else None, train_r, int(cfg.seed))
        norm_samples = [s[0] for s in sampler(norm_prompts, 1, self.normalize.max_new_tokens,
                                             self.normalize.temperature)] if norm_prompts else []
        del sampler  # with stage.policy_path it holds a second model, not needed for training

        rm = RewardModel.from_causal_lm(lm, head)
        if self.disable_dropout:  # reward targets are noisy enough; TRL's RewardConfig also disables dropout
            disable_dropout(rm)
        rm.train()
        print(f"[rlhf] reward model: {type(rm.trunk).__name__} trunk + {type(head).__name__} head "
              f"({head.members} member(s)), {count_parameters(rm) / 1e6:.2f} M parameters")
        ctx.run.log_params({"data.train_comparisons": str(len(train)), "data.val_comparisons": str(len(val)),
                            "data.train_pairs": str(pairs), "stage.max_steps_resolved": str(max_steps)})
        module = RewardModule(rm, loss, self.optimizer, self.scheduler)
        data = ComparisonDataModule(train, val, self.batch_size, tokenizer.pad_token_id, self.num_workers,
                                    self.group_by_length, int(cfg.seed), drop_last=drop_last, shards=world)
        trainer = build_trainer(ctx, callbacks=[], every_n_steps=self.checkpoint_every_n_steps,
                                lengthen="raise stage.epochs (or trainer.max_steps with stage.epochs=null) and pass "
                                         "ckpt_path=<this checkpoint> (resume=true refuses a changed stage.epochs)",
                                overrides={"max_steps": max_steps,
                                           "log_every_n_steps": log_interval(cfg.trainer.get("log_every_n_steps"),
                                                                             max_steps)},
                                limit_val_batches=1.0 if val else 0)
        if ctx.ckpt_path is None and val:
            trainer.validate(module, datamodule=data, verbose=False)
        trainer.fit(module, datamodule=data, ckpt_path=ctx.ckpt_path)
        results = trainer.validate(module, datamodule=data, verbose=False) if val else []
        final = {k: float(v) for k, v in (results[0] if results else {}).items()}

        artifact_dir = ctx.output_dir / "reward_model"
        if trainer.is_global_zero:
            extra: dict[str, Any] = {"format": self.format, "max_length": self.max_length, "normalized_on": 0,
                                     "train_comparisons": len(train)}
            if norm_samples:
                raw = score_texts(rm, tokenizer, [p.text for p in norm_prompts], norm_samples, self.format,
                                  self.max_length, raw=True)
                raw = raw[~torch.isnan(raw)]
                stats = rm.set_normalization(raw, self.normalize.target_mean,
                                             self.normalize.target_std)
                extra["normalized_on"] = int(raw.numel())
                final.update({f"normalization/{k}": v for k, v in stats.items()})
                trainer.logger.log_metrics({f"normalization/{k}": v for k, v in stats.items()}, step=trainer.global_step)
                print(f"[rlhf] reward normalised on {raw.numel()} policy samples: raw mean {stats['raw_mean']:.3f}, "
                      f"std {stats['raw_std']:.3f} -> gain {stats['gain']:.3f}, bias {stats['bias']:.3f}")
            head_spec = {k: v for k, v in _plain(cfg.reward_head).items()}
            export_reward_model(rm, head, head_spec, tokenizer, artifact_dir, extra)
            logged = ctx.run.log_dir(artifact_dir, "reward_model", float(cfg.logger.get("log_model_max_mb", 200)))
            print(f"[rlhf] exported reward model + tokenizer to {artifact_dir}" + ("" if logged else " (path tagged)"))
            for k in ("val/accuracy", "val/gold_accuracy", "val/spearman_gold", "val/calibration_error"):
                if k in final:
                    print(f"[rlhf] {k} = {final[k]:.4f}")
        return StageResult(artifact_dir=artifact_dir, metrics=final)

    def _normalization_prompts(self, task: Task | None, train: Sequence[Ranking], seed: int) -> list[Prompt]:
        n = self.normalize.samples
        if n <= 0:
            return []
        if task is not None:  # the prompts the comparisons were sampled for, a fresh draw
            return task.prompts(n, seed + 31)
        texts = [r.prompt for r in train]  # a file's own prompts
        return [Prompt(texts[i % len(texts)]) for i in range(n)]


def _no_sampling(*args: Any, **kwargs: Any):
    raise ConfigError("this comparison dataset asked for policy samples but does not declare needs_policy = True")


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)
