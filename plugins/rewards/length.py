"""Response length as a reward: the best-known proxy that RLHF policies exploit (longer is not better), and a gold
that a small reward model learns quickly, which makes it the plumbing check of reward learning."""

from __future__ import annotations

from typing import Sequence

from framework.interfaces import RewardFunction
from framework.records import Prompt


class Length(RewardFunction):
    """Characters in the completion (stripped); with `target`, minus the distance to it (peak at `target`)."""

    name = "length"

    def __init__(self, target: int | None = None, scale: float = 0.01):
        if target is not None and target < 0:
            raise ValueError("length target must be >= 0")
        self.target, self.scale = target, scale

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        lengths = [len(c.strip()) for c in completions]
        if self.target is None:
            return [self.scale * n for n in lengths]
        return [-self.scale * abs(n - self.target) for n in lengths]
