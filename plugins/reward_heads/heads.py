"""Reward heads. Linear maps are bias-free (a constant offset cancels in every preference loss; the normalisation
after training sets the offset) and start from N(0, 1/sqrt(d + 1)) (RLHF_REFERENCE 1.2 item 4)."""

from __future__ import annotations

import math

import torch
from torch import nn

from framework.interfaces import RewardHead


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """The rightmost attended position of each row (works with left or right padding), as transformers'
    `...ForSequenceClassification` picks it."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


def reward_linear(hidden_size: int, outputs: int) -> nn.Linear:
    layer = nn.Linear(hidden_size, outputs, bias=False)
    nn.init.normal_(layer.weight, std=1.0 / math.sqrt(hidden_size + 1))
    return layer


class _Pooled(nn.Module):
    def __init__(self, hidden_size: int, outputs: int, pool: str):
        super().__init__()
        self.pool = pool
        self.score = reward_linear(hidden_size, outputs)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pool == "last_token":
            rows = torch.arange(hidden.size(0), device=hidden.device)
            pooled = hidden[rows, last_token_index(attention_mask)]
        else:
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return self.score(pooled)


POOLS = ("last_token", "mean")


class LastToken(RewardHead):
    """The standard head: a linear map of the last token's hidden state. Exports as `...ForSequenceClassification`."""

    sequence_classification = True

    def build(self, hidden_size: int) -> nn.Module:
        return _Pooled(hidden_size, 1, "last_token")


class MeanPool(RewardHead):
    """A linear map of the mean hidden state over all non-pad tokens."""

    def build(self, hidden_size: int) -> nn.Module:
        return _Pooled(hidden_size, 1, "mean")


class Ensemble(RewardHead):
    """`members` linear heads on one trunk, each from its own random start and each trained by the loss; the
    reward is their mean and their spread (std) measures disagreement (logged as `reward_std_members`).
    For an ensemble of independently trained reward models, sweep `seed` instead."""

    def __init__(self, members: int = 4, pool: str = "last_token"):
        if members < 2:
            raise ValueError("reward_head.members must be >= 2 for an ensemble")
        if pool not in POOLS:
            raise ValueError(f"reward_head.pool must be one of {POOLS}")
        self.members, self.pool = members, pool

    def build(self, hidden_size: int) -> nn.Module:
        return _Pooled(hidden_size, self.members, self.pool)
