"""Critic-free algorithms that sample several responses per prompt and use the group as the baseline, and
REINFORCE with a running baseline. All score whole sequences; the policy loss is the clipped surrogate (with one
epoch the ratio is 1 and it is the plain policy gradient)."""

from __future__ import annotations

import torch

from framework.errors import ConfigError
from framework.interfaces import PolicyAlgorithm, Rollout
from framework.rl import ESTIMATORS, kl_estimate, masked_mean, rollout_mean, rollout_mean_std
from plugins.algorithms.common import broadcast, clipped_surrogate, sequence_kl


class _SequenceAlgorithm(PolicyAlgorithm):
    def __init__(self, generations: int, epochs: int, minibatches: int, clip: float):
        if generations < 1 or epochs < 1 or minibatches < 1 or clip <= 0:
            raise ConfigError("algo.generations, algo.epochs, algo.minibatches must be >= 1 and algo.clip > 0")
        self.generations_per_prompt, self.epochs, self.minibatches, self.clip = generations, epochs, minibatches, clip

    def loss(self, logprobs, values, mb):
        return clipped_surrogate(logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"], self.clip)

    def groups(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return x.view(-1, k)


class GRPO(_SequenceAlgorithm):
    """Group relative policy optimisation (Shao et al. 2024): advantage = (score - group mean) / group std on every
    token; the KL to the reference is a loss term, beta * KL per token (not in the reward), estimated with
    `kl_estimator` (k3 as in the paper; `kl.estimator` is the one the logged sequence KL uses)."""

    def __init__(self, generations: int = 4, epochs: int = 1, minibatches: int = 1, clip: float = 0.2,
                 beta: float | None = None, scale_rewards: bool = True, kl_estimator: str = "k3"):
        super().__init__(generations, epochs, minibatches, clip)
        if generations < 2:
            raise ConfigError("GRPO needs algo.generations >= 2 (the group is the baseline)")
        if kl_estimator not in ESTIMATORS:
            raise ConfigError(f"algo.kl_estimator={kl_estimator!r}: the KL loss term's estimator is one of "
                              f"{', '.join(ESTIMATORS)}")
        self.beta, self.scale_rewards, self.kl_estimator = beta, scale_rewards, kl_estimator

    def needs_reference(self, kl_coef: float, adaptive: bool) -> bool:
        return adaptive or (kl_coef if self.beta is None else self.beta) != 0.0

    def make_experience(self, rollout: Rollout, kl_coef: float, kl_estimator: str) -> dict[str, torch.Tensor]:
        g = self.groups(rollout.scores, rollout.group_size)
        adv = g - g.mean(-1, keepdim=True)
        if self.scale_rewards:
            adv = adv / (g.std(-1, keepdim=True) + 1e-4)
        _, seq_kl = sequence_kl(rollout, kl_estimator)
        beta = kl_coef if self.beta is None else self.beta
        return {"old_logprobs": rollout.logprobs, "ref_logprobs": rollout.ref_logprobs,
                "advantages": broadcast(adv.reshape(-1), rollout.response_mask), "mask": rollout.response_mask,
                "seq_kl": seq_kl, "beta": torch.tensor(beta), "advantages/group_std": g.std(-1).mean()}

    def loss(self, logprobs, values, mb):
        loss, metrics = super().loss(logprobs, values, mb)
        kl = masked_mean(kl_estimate(logprobs, mb["ref_logprobs"], self.kl_estimator), mb["mask"])
        metrics["loss/kl"] = kl.detach()
        return loss + float(mb["beta"]) * kl, metrics


class RLOO(_SequenceAlgorithm):
    """REINFORCE leave-one-out (Ahmadian et al. 2024): the reward (score - beta * sequence KL) of each sample minus
    the mean reward of the other samples of its prompt, on every token."""

    def __init__(self, generations: int = 4, epochs: int = 1, minibatches: int = 1, clip: float = 0.2,
                 normalize_advantages: bool = False):
        super().__init__(generations, epochs, minibatches, clip)
        if generations < 2:
            raise ConfigError("RLOO needs algo.generations >= 2 (the other samples are the baseline)")
        self.normalize_advantages = normalize_advantages

    def make_experience(self, rollout: Rollout, kl_coef: float, kl_estimator: str) -> dict[str, torch.Tensor]:
        _, seq_kl = sequence_kl(rollout, kl_estimator)
        reward = self.groups(rollout.scores - kl_coef * seq_kl, rollout.group_size)
        k = reward.size(-1)
        baseline = (reward.sum(-1, keepdim=True) - reward) / (k - 1)
        adv = (reward - baseline).reshape(-1)
        if self.normalize_advantages:  # over the whole rollout (every process's share under DDP)
            mean, std = rollout_mean_std(adv)
            adv = (adv - mean) / (std + 1e-8)
        return {"old_logprobs": rollout.logprobs, "advantages": broadcast(adv, rollout.response_mask),
                "mask": rollout.response_mask, "seq_kl": seq_kl, "non_score_reward": -kl_coef * seq_kl}


class Reinforce(_SequenceAlgorithm):
    """REINFORCE with a baseline: advantage = (score - beta * sequence KL) - b, with b an exponential moving average
    of past rewards (`baseline_decay`; its state is checkpointed with the algorithm)."""

    def __init__(self, epochs: int = 1, minibatches: int = 1, clip: float = 0.2, baseline_decay: float = 0.9):
        super().__init__(1, epochs, minibatches, clip)
        if not 0.0 <= baseline_decay < 1.0:
            raise ConfigError("algo.baseline_decay must be in [0, 1)")
        self.decay = baseline_decay
        self.baseline: float | None = None

    def make_experience(self, rollout: Rollout, kl_coef: float, kl_estimator: str) -> dict[str, torch.Tensor]:
        _, seq_kl = sequence_kl(rollout, kl_estimator)
        reward = rollout.scores - kl_coef * seq_kl
        mean = float(rollout_mean(reward))  # over the whole rollout: the baseline is the same on every process
        baseline = mean if self.baseline is None else self.baseline
        adv = reward - baseline
        self.baseline = self.decay * baseline + (1 - self.decay) * mean
        return {"old_logprobs": rollout.logprobs, "advantages": broadcast(adv, rollout.response_mask),
                "mask": rollout.response_mask, "seq_kl": seq_kl, "non_score_reward": -kl_coef * seq_kl,
                "advantages/baseline": torch.tensor(baseline)}

    def state_dict(self) -> dict:
        return {"baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        self.baseline = state.get("baseline")
