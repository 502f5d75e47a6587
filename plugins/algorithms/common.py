"""Pieces the policy algorithms share: the clipped surrogate and sequence-level KL."""

from __future__ import annotations

import torch

from framework.interfaces import Rollout
from framework.rl import kl_estimate, masked_mean


def sequence_kl(rollout: Rollout, estimator: str) -> torch.Tensor:
    """Per-token KL estimate to the reference [B, T] (0 on padding) and its sum over tokens [B]."""
    kl = kl_estimate(rollout.logprobs, rollout.ref_logprobs, estimator) * rollout.response_mask
    return kl, kl.sum(-1)


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's policy loss, mean over real tokens of max(-A r, -A clip(r, 1-eps, 1+eps)), with its diagnostics:
    approx KL 0.5 E[(log r)^2] and the fraction of tokens where the clip is active."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {"loss/policy": loss.detach(),
                   "policy/approxkl": 0.5 * masked_mean(log_ratio**2, mask),
                   "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask),
                   "policy/ratio": masked_mean(ratio, mask)}
    return loss, metrics


def broadcast(seq_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A per-sequence value on every real token [B, T]."""
    return seq_values.unsqueeze(-1) * mask.to(seq_values.dtype)
