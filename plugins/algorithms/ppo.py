"""PPO for language models as OpenAI's lm-human-preferences and TRL implement it (RLHF_REFERENCE 1.1): per-token
KL penalty in the reward with the score at the last real token, GAE (gamma 1, lambda 0.95) on a value head, returns
before advantage whitening, clipped policy and value losses, several epochs of minibatches per rollout."""

from __future__ import annotations

import torch

from framework.errors import ConfigError, checked_number
from framework.interfaces import PolicyAlgorithm, Rollout
from framework.rl import explained_variance, gae, masked_mean, masked_var, token_rewards, whiten
from plugins.algorithms.common import clipped_surrogate, sequence_kl


class PPO(PolicyAlgorithm):
    needs_value = True

    def __init__(self, epochs: int = 4, minibatches: int = 4, clip: float = 0.2, value_clip: float = 0.2,
                 vf_coef: float = 0.1, gamma: float = 1.0, lam: float = 0.95, whiten_rewards: bool = False,
                 critic: str = "shared", critic_path: str | None = None, value_layers: int = 0,
                 critic_layers: int | None = None):
        if epochs < 1 or minibatches < 1 or clip <= 0 or value_clip <= 0:
            raise ConfigError("algo.epochs and algo.minibatches must be >= 1, algo.clip and algo.value_clip > 0")
        if critic not in ("shared", "separate"):
            raise ConfigError(f"algo.critic={critic}: use shared (a value head on the policy) or separate (a "
                              "transformer of its own, from a reward model)")
        value_layers = checked_number("algo.value_layers", value_layers, whole=True, at_least=0,
                                      note="0: the value layer on the policy's last hidden state; N: on a branch of "
                                           "copies of the policy's top N layers")
        critic_layers = checked_number("algo.critic_layers", critic_layers, whole=True, at_least=1, allow_none=True,
                                       note="the separate critic keeps the reward model's bottom N layers; null: all "
                                            "of them")
        if value_layers and critic != "shared":
            raise ConfigError(f"algo.value_layers={value_layers} is for algo.critic=shared (a value head on the "
                              f"policy); algo.critic={critic} has a transformer of its own: set algo.value_layers=0")
        if critic_layers is not None and critic != "separate":
            raise ConfigError(f"algo.critic_layers={critic_layers} cuts the separate critic's transformer (the "
                              f"reward model's) to its bottom layers; algo.critic={critic} has none: set "
                              "algo.critic=separate, or algo.critic_layers=null")
        self.epochs, self.minibatches, self.clip, self.value_clip = epochs, minibatches, clip, value_clip
        self.vf_coef, self.gamma, self.lam, self.whiten_rewards = vf_coef, gamma, lam, whiten_rewards
        self.critic, self.critic_path, self.value_layers = critic, critic_path, value_layers
        self.critic_layers = critic_layers

    def make_experience(self, rollout: Rollout, kl_coef: float, kl_estimator: str) -> dict[str, torch.Tensor]:
        mask = rollout.response_mask
        kl, seq_kl = sequence_kl(rollout, kl_estimator)
        rewards = token_rewards(rollout.scores, kl, mask, kl_coef)
        if self.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, rollout.values, mask, self.gamma, self.lam)
        return {"old_logprobs": rollout.logprobs, "old_values": rollout.values, "advantages": whiten(advantages, mask),
                "returns": returns, "mask": mask, "seq_kl": seq_kl, "non_score_reward": -kl_coef * seq_kl,
                "returns/mean": masked_mean(returns, mask), "returns/var": masked_var(returns, mask),
                "advantages/mean_raw": masked_mean(advantages, mask)}

    def loss(self, logprobs, values, mb):
        mask = mb["mask"]
        pg_loss, metrics = clipped_surrogate(logprobs, mb["old_logprobs"], mb["advantages"], mask, self.clip)
        old = mb["old_values"]
        clipped_values = old + torch.clamp(values - old, -self.value_clip, self.value_clip)
        vf_unclipped = (values - mb["returns"]) ** 2
        vf_clipped = (clipped_values - mb["returns"]) ** 2
        vf_loss = 0.5 * masked_mean(torch.max(vf_unclipped, vf_clipped), mask)
        with torch.no_grad():
            metrics.update({"loss/value": vf_loss.detach(),
                            "val/clipfrac": masked_mean((vf_clipped > vf_unclipped).float(), mask),
                            "val/var_explained": explained_variance(values, mb["returns"], mask),
                            "val/mean": masked_mean(values, mask)})
        return pg_loss + self.vf_coef * vf_loss, metrics
