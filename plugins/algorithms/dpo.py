"""Direct preference optimisation (Rafailov et al. 2023) and IPO (Azar et al. 2023): offline, on comparisons."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.errors import ConfigError
from framework.interfaces import PreferenceAlgorithm

LOSSES = ("sigmoid", "ipo")


class DPO(PreferenceAlgorithm):
    """h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), log-probs summed over response tokens.
    sigmoid (DPO): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h) (eps = label_smoothing, cDPO);
    ipo: (h - 1 / (2 beta))^2, with log-probs averaged over tokens instead of summed (as the IPO paper and TRL)."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        if beta <= 0:
            raise ConfigError("algo.beta must be > 0")
        if loss_type not in LOSSES:
            raise ConfigError(f"algo.loss_type={loss_type!r}; expected one of {LOSSES}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ConfigError("algo.label_smoothing must be in [0, 0.5)")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.average_logprobs = loss_type == "ipo"

    def loss(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        chosen = policy_chosen - ref_chosen
        rejected = policy_rejected - ref_rejected
        h = chosen - rejected
        if self.loss_type == "ipo":
            losses = (h - 1.0 / (2.0 * self.beta)) ** 2
        else:
            eps = self.label_smoothing
            losses = -(1 - eps) * F.logsigmoid(self.beta * h) - eps * F.logsigmoid(-self.beta * h)
        with torch.no_grad():
            metrics = {"rewards/chosen": (self.beta * chosen).mean(), "rewards/rejected": (self.beta * rejected).mean(),
                       "rewards/accuracies": (h > 0).float().mean(), "rewards/margins": (self.beta * h).mean(),
                       "logps/chosen": policy_chosen.mean(), "logps/rejected": policy_rejected.mean()}
        return losses.mean(), metrics
