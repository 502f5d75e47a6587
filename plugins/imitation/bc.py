"""Behaviour cloning: one round on the demonstrations."""

from __future__ import annotations

from framework.interfaces import Example, ImitationAlgorithm, ImitationContext


class BehaviourCloning(ImitationAlgorithm):
    num_rounds = 1

    def __init__(self):
        self._metrics: dict[str, float] = {}

    def round_dataset(self, round_idx: int, ctx: ImitationContext) -> list[Example]:
        labels = sum(sum(l != -100 for l in ex.labels) for ex in ctx.demonstrations)
        self._metrics = {"round": round_idx, "dataset_size": len(ctx.demonstrations), "expert_labels": labels}
        return list(ctx.demonstrations)

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)
