"""Learned reward models as reward sources for RL: one reward model export, or an ensemble of several."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import torch

from framework.errors import ConfigError, refuse_unknown_keys
from framework.interfaces import RewardFunction
from framework.models import disable_dropout
from framework.records import Prompt
from framework.reward import load_reward_model, reward_scores, score_texts

AGGREGATES = ("mean", "min", "mean_minus_std", "mean_minus_var")


class LearnedReward(RewardFunction):
    """A reward-model directory of ours (either layout) or any `...ForSequenceClassification` dir, read with the
    formatting it was trained with, normalised by the gain/bias stored at training time.

    The reward model reads text: a policy with another tokenizer is scored through its decoded text, re-tokenised
    by the reward model's own tokenizer. A dir without normalisation is refused unless `allow_unnormalized=true`.

    A sample longer than the reward model's max_length is cut from the left, the prompt first, then the start of the
    response, and scored on what is left (the score is read at the last token). `scored` counts the samples, `cut`
    those scored without any of their prompt; the first cut warns once for this reward, with the numbers and the fix.
    """

    name = "learned"

    def __init__(self, path: str, batch_size: int = 64, allow_unnormalized: bool = False, format: str | None = None,
                 max_length: int | None = None, key: str = "reward.path"):
        # key: the setting that gave `path`, named when its files cannot be read (set by the plugins that wrap this
        # one: task.path for task=rm_gold, reward.paths[i] for an ensemble member)
        if not path:
            raise ConfigError("reward=learned needs reward.path=<a reward model dir>")
        self.path = str(Path(path).expanduser())
        self.model, self.tokenizer, info = load_reward_model(self.path, key)
        disable_dropout(self.model)  # scored in eval mode anyway; this keeps it so whatever calls .train()
        if not info.get("normalized_on") and not allow_unnormalized:
            raise ConfigError(f"reward model {self.path} has no normalisation (rlhf_reward.normalized_on in its "
                              "config.json): train it with stage.normalize.samples > 0, or pass "
                              "reward.allow_unnormalized=true to use its raw scores")
        self.format = format or info.get("format", "chat")
        self.max_length = int(max_length or info.get("max_length") or self.tokenizer.model_max_length)
        if self.max_length < 1:
            raise ConfigError(f"reward model {self.path}: max_length={self.max_length}; it must be >= 1")
        self.batch_size = batch_size
        self.scored, self.cut, self._warned = 0, 0, False

    def to(self, device) -> "LearnedReward":
        self.model.to(device)
        return self

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        counts: dict[str, int] = {}
        values = score_texts(self.model, self.tokenizer, [p.text for p in prompts], list(completions), self.format,
                             self.max_length, self.batch_size, counts=counts)
        self.scored += len(completions)
        self.cut += counts.get("cut", 0)
        if self.cut and not self._warned:
            self._warned = True
            warnings.warn(f"reward model {self.path}: {self.cut} of {self.scored} samples scored so far do not fit in "
                          f"its max_length={self.max_length} tokens with any of their prompt; each was scored on its "
                          f"last {self.max_length} tokens (prompt and start of the response cut). Train the reward "
                          "model with a larger stage.max_length, or lower stage.max_new_tokens (this warning is not "
                          "repeated; `.cut` keeps counting)", stacklevel=2)
        return [v if math.isfinite(v) else float("nan") for v in values.tolist()]


class RewardEnsemble(RewardFunction):
    """K reward models combined per sample: `mean`, `min` (worst case), `mean_minus_std` (mean - lam * std) or
    `mean_minus_var` (mean - lam * variance, the uncertainty penalty of Coste et al. 2023); std and variance are
    over the K members (unbiased)."""

    name = "ensemble"

    def __init__(self, paths: Sequence[str], aggregate: str = "mean", lam: float = 1.0, allow_unnormalized: bool = False):
        if isinstance(paths, (str, Path)):  # `reward.paths=<dir>` (no brackets) gives a string, not a list
            raise ConfigError(f"reward.paths={str(paths)!r} is one string; reward=ensemble needs a list of at least "
                              "two reward model dirs, in brackets (quoted for the shell): reward.paths='[<rm1>,<rm2>]'")
        if len(paths) < 2:
            raise ConfigError(f"reward=ensemble needs reward.paths with at least two reward model dirs, got "
                              f"{len(paths)}: reward.paths='[<rm1>,<rm2>]' (for one, reward=learned reward.path=<dir>)")
        if aggregate not in AGGREGATES:
            raise ConfigError(f"reward.aggregate={aggregate!r}; expected one of {AGGREGATES}")
        self.members = [LearnedReward(p, allow_unnormalized=allow_unnormalized, key=f"reward.paths[{i}]")
                        for i, p in enumerate(paths)]
        self.aggregate, self.lam = aggregate, lam

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        scores = torch.tensor([m.score(prompts, completions) for m in self.members])
        return combine(scores, self.aggregate, self.lam).tolist()


def combine(scores: torch.Tensor, aggregate: str, lam: float = 1.0) -> torch.Tensor:
    """[members, samples] -> [samples] by `aggregate` (one of AGGREGATES)."""
    if aggregate == "mean":
        return scores.mean(0)
    if aggregate == "min":
        return scores.min(0).values
    if aggregate == "mean_minus_std":
        return scores.mean(0) - lam * scores.std(0)
    if aggregate == "mean_minus_var":
        return scores.mean(0) - lam * scores.var(0)
    raise ConfigError(f"reward.aggregate={aggregate!r}; expected one of {AGGREGATES}")


class WeightedSum(RewardFunction):
    """sum_i weight_i * reward_i over reward sources given as {name: {weight: w, reward: {_target_: ...}}}."""

    name = "sum"

    def __init__(self, components: dict):
        if not components:
            raise ConfigError("reward=sum needs reward.components: {name: {weight: w, reward: {_target_: ...}}}")
        self.components = []
        for name, spec in components.items():
            if isinstance(spec, dict):  # a misspelt weight would otherwise silently weigh 1.0
                refuse_unknown_keys(f"reward.components.{name}", spec, ("weight", "reward"))
            reward = spec.get("reward") if isinstance(spec, dict) else None
            if not isinstance(reward, RewardFunction):
                raise ConfigError(f"reward.components.{name}.reward must be a reward source (with _target_)")
            self.components.append((name, float(spec.get("weight", 1.0)), reward))

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        total = [0.0] * len(completions)
        for _, weight, reward in self.components:
            # each component's contract checked (a short list would leave zeros, a long one fail by index)
            scores = reward_scores(reward, reward.score(prompts, completions), len(completions), dtype=torch.float64)
            for i, v in enumerate(scores.tolist()):
                total[i] += weight * v
        return total
