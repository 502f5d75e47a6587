"""A task whose gold is a reward model: the synthetic setup of Gao et al. 2022, where a large "gold" RM stands in
for the human and labels the comparisons that train the (smaller) proxies.

The prompts, the expert and the environment are the base task's; only the gold changes. A hand-written gold can
saturate (friendliness tops out near 0.9 within a few nats of KL), so no proxy can push its peak further out; a
gold RM's score has no fixed ceiling (docs/reproductions.md has what that showed). The gold RM is read, normalised
and scored exactly as `reward=learned` would read it.
"""

from __future__ import annotations

from typing import Sequence

from framework.errors import ConfigError
from framework.interfaces import Task
from framework.records import Demonstration, Prompt
from plugins.rewards.learned import LearnedReward


class RewardModelGold(Task):
    """`base`'s prompts (and expert), judged by the reward model in `path` (our export or any
    `...ForSequenceClassification` dir, with its normalisation). Its gold has no exactly-right level, so task
    evaluation reports no `eval/exact_match`."""

    exact_score = None

    def __init__(self, base: Task, path: str, batch_size: int = 64):
        if not isinstance(base, Task):
            raise ConfigError(f"task.base must be a task (a `_target_` naming a Task class), got {type(base).__name__}")
        if not path:
            raise ConfigError("task=rm_gold needs task.path=<the gold reward model dir>")
        self.base = base
        self.reward = LearnedReward(path, batch_size=batch_size, key="task.path")
        self.name = base.name  # the same prompts (a task draws them by its name) and the same policy-sample cache

    def prompts(self, n: int, seed: int) -> list[Prompt]:
        return self.base.prompts(n, seed)

    def gold(self, prompt: Prompt, completion: str) -> float:
        return self.golds([prompt], [completion])[0]

    def golds(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        return self.reward.score(prompts, completions)

    def expert_continuation(self, prompt: Prompt, prefix: str) -> str:
        return self.base.expert_continuation(prompt, prefix)

    def demonstration(self, prompt: Prompt) -> Demonstration:
        return self.base.demonstration(prompt)

    def environment(self, prompt: Prompt, prefix: str) -> str:
        return self.base.environment(prompt, prefix)

    @property
    def has_environment(self) -> bool:
        return self.base.has_environment
