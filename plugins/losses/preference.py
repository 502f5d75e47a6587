"""Preference losses for reward models (kind "preference").

Each takes rewards `[groups, K]` in preference order (column 0 = the best response of its group), the mask of real
entries and optional per-group margins, and returns the mean loss over groups. A pairwise comparison is a group of
two; a K-wise ranking is one group, so all its C(K, 2) pairs share a batch element (InstructGPT).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from framework.interfaces import Loss


def ordered_pairs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors (a, b) over columns with a < b (a preferred to b) and the [groups, pairs] validity mask."""
    k = mask.size(1)
    a, b = torch.triu_indices(k, k, offset=1, device=mask.device)
    return a, b, mask[:, a] & mask[:, b]


class PreferenceLoss(Loss):
    """Common part: the optional centring regulariser and the metrics every preference loss reports.

    center_coef: adds center_coef * mean over groups of (the group's mean reward)^2, which keeps rewards near zero
    (TRL's `center_rewards_coefficient` penalises (r_chosen + r_rejected)^2, i.e. 4x this term for pairs).
    """

    kind = "preference"

    def __init__(self, center_coef: float = 0.0):
        if center_coef < 0:
            raise ValueError("loss.center_coef must be >= 0")
        self.center_coef = center_coef

    def group_losses(self, rewards: torch.Tensor, mask: torch.Tensor, margin: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, rewards: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = batch["rank_mask"].bool()
        rewards = rewards.float()
        loss = self.group_losses(rewards, mask, batch.get("margin")).mean()
        metrics = self.pair_metrics(rewards, mask)
        if self.center_coef:
            group_mean = (rewards * mask).sum(1) / mask.sum(1)
            center = group_mean.pow(2).mean()
            loss = loss + self.center_coef * center
            metrics["center_penalty"] = center.detach()
        return loss, metrics

    @staticmethod
    def pair_metrics(rewards: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        a, b, valid = ordered_pairs(mask)
        diff = (rewards[:, a] - rewards[:, b])[valid].detach()
        return {"accuracy": (diff > 0).float().mean(), "margin": diff.mean()}


class BradleyTerry(PreferenceLoss):
    """-log sigmoid(r_better - r_worse), averaged over the pairs of each group, then over groups."""

    def group_losses(self, rewards, mask, margin=None):
        a, b, valid = ordered_pairs(mask)
        losses = -F.logsigmoid(rewards[:, a] - rewards[:, b] - self.pair_margin(margin, rewards))
        return (losses * valid).sum(1) / valid.sum(1).clamp(min=1)

    def pair_margin(self, margin: torch.Tensor | None, rewards: torch.Tensor) -> torch.Tensor | float:
        return 0.0


class Margin(BradleyTerry):
    """Bradley-Terry with a margin (Llama 2): -log sigmoid(r_better - r_worse - m).

    m is the row's own `margin` when the data has one (use_data_margin) and `margin` otherwise.
    """

    def __init__(self, margin: float = 1.0, use_data_margin: bool = True, center_coef: float = 0.0):
        super().__init__(center_coef)
        self.margin, self.use_data_margin = float(margin), use_data_margin

    def pair_margin(self, margin, rewards):
        m = torch.full((rewards.size(0), 1), self.margin, device=rewards.device)
        if self.use_data_margin and margin is not None:
            data = margin.to(rewards).view(-1, 1)
            m = torch.where(torch.isnan(data), m, data)
        return m


class PlackettLuce(PreferenceLoss):
    """K-wise listwise loss: the negative log-likelihood of the whole ranking under Plackett-Luce,
    sum_k [logsumexp(r_k, ..., r_K) - r_k], divided by the K - 1 choices. For K = 2 it is Bradley-Terry."""

    def group_losses(self, rewards, mask, margin=None):
        masked = rewards.masked_fill(~mask, float("-inf"))
        # log-sum-exp of each suffix r_k..r_K: a reversed cumulative logsumexp
        suffix = torch.logcumsumexp(masked.flip(1), dim=1).flip(1)
        choice = mask.clone()
        choice[:, :-1] &= mask[:, 1:]  # position k is a real choice when something ranks below it
        choice[:, -1] = False
        terms = torch.where(choice, suffix - rewards, torch.zeros_like(rewards))
        return terms.sum(1) / choice.sum(1).clamp(min=1)
