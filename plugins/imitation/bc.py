"""Behaviour cloning: one round on the demonstrations."""

from __future__ import annotations

from framework.imitation import count_labels
from framework.interfaces import Example, ImitationAlgorithm, ImitationContext


class BehaviourCloning(ImitationAlgorithm):
    num_rounds = 1

    def __init__(self):
        self._metrics: dict[str, float] = {}

    def round_dataset(self, round_idx: int, ctx: ImitationContext) -> list[Example]:
        self._metrics = {"round": round_idx, "dataset_size": len(ctx.demonstrations),
                         "expert_labels": count_labels(ctx.demonstrations)}
        return list(ctx.demonstrations)

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)
