"""A task's own gold scorer as a reward function."""

from __future__ import annotations

from typing import Sequence

from framework.interfaces import RewardFunction, Task
from framework.records import Prompt


class TaskGold(RewardFunction):
    def __init__(self, task: Task):
        if task is None:
            raise ValueError("the task gold needs a task: pick one with task=<name>")
        self.task = task
        self.name = f"{task.name}_gold"

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        return [float(self.task.gold(p, c)) for p, c in zip(prompts, completions)]
