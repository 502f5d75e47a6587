"""Next-token cross-entropy for causal LMs."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from framework.interfaces import IGNORE_INDEX, Loss


def shifted_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of predicting labels[:, t+1] from logits[:, t].

    logits: [batch, seq, vocab]; labels: [batch, seq] with IGNORE_INDEX where no loss is taken.
    Returns (mean loss over counted tokens, number of counted tokens).
    """
    pred = logits[:, :-1, :].float()
    target = labels[:, 1:]
    count = (target != IGNORE_INDEX).sum()
    loss = F.cross_entropy(pred.reshape(-1, pred.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / count.clamp(min=1), count


class LMCrossEntropy(Loss):
    def __call__(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, count = shifted_token_loss(outputs.logits, batch["labels"])
        return loss, {"tokens": count.detach().float()}
