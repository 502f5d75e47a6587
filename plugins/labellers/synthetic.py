"""A synthetic human: compares responses by a hidden gold reward, with Bradley-Terry noise.

For two responses P(a preferred to b) = sigmoid((g(a) - g(b)) / tau). For K responses the ranking is drawn from
the Plackett-Luce model with scores g / tau (sort by g / tau + Gumbel noise), whose pairwise marginals are exactly
that sigmoid. tau = 0 ranks by gold alone (ties broken at random). With probability `flip_rate` the whole ranking
is reversed afterwards (a labeller who misread the task). The gold scores are recorded with each ranking.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from framework.errors import ConfigError, RLHFError
from framework.interfaces import Labeller, RewardFunction
from framework.records import Prompt, Ranking


class SyntheticLabeller(Labeller):
    def __init__(self, gold: RewardFunction, tau: float = 0.1, flip_rate: float = 0.0):
        if not tau >= 0:
            raise ConfigError(f"labeller.tau={tau} must be >= 0 (0 = noiseless)")
        if not 0.0 <= flip_rate <= 1.0:
            raise ConfigError(f"labeller.flip_rate={flip_rate} must be in [0, 1]")
        self.gold, self.tau, self.flip_rate = gold, float(tau), float(flip_rate)

    def label(self, prompt: Prompt, responses: Sequence[str], rng: random.Random) -> Ranking:
        return self.label_many([prompt], [responses], rng)[0]

    def label_many(self, prompts: Sequence[Prompt], groups: Sequence[Sequence[str]],
                   rng: random.Random) -> list[Ranking]:
        """All groups' responses scored by the gold in one call (a reward-model gold batches them), then ranked
        group by group: the same random draws, so the same rankings, as labelling one group at a time."""
        import torch

        from framework.reward import reward_scores

        flat_prompts = [p for p, g in zip(prompts, groups) for _ in g]
        texts = [r for g in groups for r in g]
        flat = reward_scores(self.gold, self.gold.score(flat_prompts, texts), len(texts), dtype=torch.float64).tolist()
        bad = [i for i, v in enumerate(flat) if not math.isfinite(v)]
        if bad:  # a ranking by NaN is arbitrary, and the recorded gold would carry it into every metric
            first = f"{texts[bad[0]][:80]!r} to {flat_prompts[bad[0]].text[:80]!r}"
            raise RLHFError(f"the labeller's gold {type(self.gold).__name__} returned NaN/inf for {len(bad)} of "
                            f"{len(texts)} responses (the first: {first}); a ranking needs a finite score for each: "
                            "fix the gold reward for these responses")
        rankings, start = [], 0
        for prompt, group in zip(prompts, groups):
            scores = flat[start : start + len(group)]
            start += len(group)
            rankings.append(Ranking(prompt.text, tuple(group), tuple(self.rank(scores, rng)), source=prompt.source,
                                    gold=tuple(scores)))
        return rankings

    def rank(self, scores: Sequence[float], rng: random.Random) -> list[int]:
        def noisy(i: int) -> tuple[float, float]:
            u = rng.random()
            tie_break = rng.random()
            if self.tau == 0:
                return scores[i], tie_break
            gumbel = -math.log(-math.log(min(max(u, 1e-12), 1 - 1e-12)))
            return scores[i] / self.tau + gumbel, tie_break

        keys = {i: noisy(i) for i in range(len(scores))}
        order = sorted(range(len(scores)), key=lambda i: keys[i], reverse=True)
        if self.flip_rate and rng.random() < self.flip_rate:
            order.reverse()
        return order
