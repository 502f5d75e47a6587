"""Comparisons made here: K responses per task prompt sampled from the policy, ranked by a labeller plugin."""

from __future__ import annotations

import random
from typing import Iterator

from framework.errors import ConfigError
from framework.interfaces import ComparisonContext, ComparisonDataset
from framework.records import Ranking


class PolicyComparisons(ComparisonDataset):
    """`n` rankings of `k` responses each, for the first `n` prompts of the configured task.

    pool: sample responses for max(n, pool) prompts (cached) and label them all, then keep the first n: runs that
    differ only in n (a sweep over the number of labels) then use nested subsets of one sample and one labelling.
    heldout: rankings for the `heldout` prompts after the pool, returned by `validation()`: one held-out set for
    every n (without it the stage holds out a share of the n).
    A prompt whose responses are all the same (e.g. two empty replies) teaches nothing and is skipped (counted).
    """

    needs_policy = True

    def __init__(self, n: int = 1000, k: int = 2, pool: int | None = None, heldout: int = 0,
                 max_new_tokens: int = 48, temperature: float = 1.0):
        if n < 1 or k < 2 or heldout < 0:
            raise ConfigError(f"dataset.n={n} must be >= 1, dataset.k={k} >= 2 and dataset.heldout={heldout} >= 0")
        if temperature <= 0:
            raise ConfigError("dataset.temperature must be > 0 (responses are sampled)")
        self.n, self.k, self.pool, self.heldout = n, k, pool, heldout
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.skipped = 0
        self._labelled: tuple[list[Ranking], list[Ranking]] | None = None

    def _label(self, ctx: ComparisonContext) -> tuple[list[Ranking], list[Ranking]]:
        if self._labelled is not None:
            return self._labelled
        if ctx.task is None:
            raise ConfigError("dataset=policy_comparisons draws its prompts from a task: add task=friendly_reply "
                              "(or sort, addition, ...)")
        if ctx.labeller is None:
            raise ConfigError("dataset=policy_comparisons needs a labeller to rank the responses: labeller=synthetic")
        train_prompts = max(self.n, self.pool or 0)
        prompts = ctx.task.prompts(train_prompts + self.heldout, ctx.seed)
        responses = ctx.sample(prompts, self.k, self.max_new_tokens, self.temperature)
        rng = random.Random(f"labels:{ctx.seed}")
        train: list[Ranking] = []
        heldout: list[Ranking] = []
        kept = [(i, list(dict.fromkeys(group))) for i, group in enumerate(responses)]
        kept = [(i, distinct) for i, distinct in kept if len(distinct) >= 2]
        self.skipped = len(prompts) - len(kept)
        rankings = ctx.labeller.label_many([prompts[i] for i, _ in kept], [distinct for _, distinct in kept], rng)
        for (i, _), ranking in zip(kept, rankings):
            (train if i < train_prompts else heldout).append(
                Ranking(ranking.prompt, ranking.responses, ranking.order, source=f"{ctx.task.name}:{i}",
                        gold=ranking.gold, margin=ranking.margin))
        self._labelled = train[: self.n], heldout
        return self._labelled

    def comparisons(self, ctx: ComparisonContext) -> Iterator[Ranking]:
        yield from self._label(ctx)[0]

    def validation(self, ctx: ComparisonContext) -> Iterator[Ranking] | None:
        return iter(self._label(ctx)[1]) if self.heldout else None

    def describe(self) -> str:
        held = f" + {self.heldout} held out" if self.heldout else ""
        return f"{self.n} rankings of {self.k} policy samples{held}, labelled here"
