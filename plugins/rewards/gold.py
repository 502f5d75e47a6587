"""A task's own gold scorer as a reward function (`reward=gold`, `labeller/gold=task`): the framework's TaskGold."""

from framework.reward import TaskGold

__all__ = ["TaskGold"]
