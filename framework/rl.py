"""The arithmetic of RL from feedback, as plain tensor functions (RLHF_REFERENCE section 1): log-probs at a sampling
temperature, KL estimators, per-token rewards with the score at the last real token, GAE, masked whitening, and
the KL coefficient controllers. No Lightning, no models: every piece is unit-tested against a hand computation.

Shapes: `[batch, T]` over response tokens; `mask` is 1 on real response tokens (up to and including the stop
token) and 0 on the padding after it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from framework.distributed import sum_over_processes, world_size
from framework.errors import ConfigError, checked_number, refuse_unknown_keys


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Biased variance over the masked entries (tf.moments, as the reference implementations)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def rollout_moments(x: torch.Tensor, mask: torch.Tensor | None = None,
                    unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of `x` over the whole rollout's entries (those in `mask`, or all): under DDP over every
    process's share, as one process holding the whole rollout would compute them. unbiased: divide by n - 1
    (torch.var's default) instead of n (tf.moments, as the reference implementations whiten). A collective under
    torch.distributed (framework/distributed.py): every process calls it at the same point."""
    if world_size() == 1 and mask is None:
        return x.mean(), x.var(unbiased=unbiased)
    if world_size() == 1 and not unbiased:
        return masked_mean(x, mask), masked_var(x, mask)
    x64, m, mean, count = _rollout_mean64(x, mask)
    squares = sum_over_processes((((x64 - mean) ** 2) * m).sum().reshape(1))[0]
    return mean.to(x.dtype), (squares / (count - 1 if unbiased else count).clamp(min=1)).to(x.dtype)


def _rollout_mean64(x: torch.Tensor, mask: torch.Tensor | None):
    """(x and the mask in float64, the mean over every process's entries, their count): one collective."""
    x64 = x.double()
    m = torch.ones_like(x64) if mask is None else mask.double()
    total = sum_over_processes(torch.stack([(x64 * m).sum(), m.sum()]))
    count = total[1].clamp(min=1)
    return x64, m, total[0] / count, count


def rollout_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of `rollout_moments` (one collective fewer)."""
    if world_size() == 1:
        return x.mean() if mask is None else masked_mean(x, mask)
    return _rollout_mean64(x, mask)[2].to(x.dtype)


def rollout_mean_std(x: torch.Tensor, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of every entry of `x` over the whole rollout (`rollout_moments`); in a single
    process exactly x.mean() and x.std()."""
    if world_size() == 1:
        return x.mean(), x.std(unbiased=unbiased)
    mean, var = rollout_moments(x, unbiased=unbiased)
    return mean, var.sqrt()


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries of the whole rollout (under DDP every process's share:
    `rollout_moments`, a collective); shift_mean=False adds the mean back (LHP's reward whitening).
    Entries outside the mask are returned as 0."""
    mean, var = rollout_moments(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`: logits [B, T, V] are the predictions of tokens [B, T].
    Differentiable, with the fused backward of `token_logprobs_and_entropy`; no entropy computed."""
    return _TokenLogprobs.apply(logits, tokens, float(temperature), False)[0]


def _entropy(logp: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    # -sum p log p as one dot product per position (no [B, T, V] product tensor written), in logp's precision even
    # under autocast (which would run the matmul in bf16)
    with torch.autocast(logp.device.type, enabled=False):
        return -(probs.unsqueeze(-2) @ logp.unsqueeze(-1)).squeeze(-1).squeeze(-1)


class _TokenLogprobs(torch.autograd.Function):
    """Forward: log softmax(logits / t) at the tokens and, with `with_entropy`, the entropy per position (not
    differentiable). Backward straight from the saved probabilities: d/dlogits = (onehot(token) - p) * g / t, two
    passes over [B, T, V] instead of autograd's gather (a zero fill and a scatter) plus log-softmax backward. The
    probabilities are only computed when the entropy or a gradient needs them (not for a frozen reference)."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, with_entropy):
        logp = _log_softmax(logits, temperature)
        needs_grad = ctx.needs_input_grad[0]
        probs = logp.exp() if needs_grad or with_entropy else None
        entropy = _entropy(logp, probs) if with_entropy else None
        if needs_grad:
            ctx.save_for_backward(probs, tokens)
            ctx.temperature, ctx.dtype = temperature, logits.dtype
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _):
        probs, tokens = ctx.saved_tensors
        out = probs * -grad.unsqueeze(-1)
        out.scatter_add_(-1, tokens.unsqueeze(-1), grad.unsqueeze(-1))
        if ctx.temperature != 1.0:
            out = out / ctx.temperature
        return out.to(ctx.dtype), None, None, None


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` (differentiable) and, from the same softmax, the entropy per position (for logging)."""
    return _TokenLogprobs.apply(logits, tokens, float(temperature), True)


ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman, "Approximating KL divergence"):
    k1 = log r (unbiased, high variance), k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r (unbiased, >= 0)."""
    logr = logp - ref_logp
    if estimator == "k1":
        return logr
    if estimator == "k2":
        return 0.5 * logr**2
    if estimator == "k3":
        return torch.exp(-logr) - 1 + logr
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {ESTIMATORS}")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (0 for an empty row)."""
    positions = torch.arange(mask.size(1), device=mask.device)
    return (positions * mask.to(positions.dtype)).argmax(-1)


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = -beta * kl_t on real tokens, plus the sequence score at the last real token (LHP / TRL)."""
    rewards = -beta * kl * mask.to(kl.dtype)
    rows = torch.arange(score.size(0), device=score.device)
    rewards[rows, last_index(mask)] += score.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation by the reverse loop; V after the last real token is 0.
    Returns (advantages, returns = advantages + values), both 0 outside the mask."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    steps = values.size(1)
    for t in reversed(range(steps)):  # padding has value 0 and reward 0, so it adds nothing after the last token
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running * mask[:, t]
    return advantages, (advantages + values) * mask


class FixedKL:
    """A constant KL coefficient."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, kl: float, n_episodes: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKL(FixedKL):
    """Ziegler et al. 2019, 2.2: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon), with n the
    episodes of the rollout and KL the per-sequence sum over tokens, averaged over the rollout."""

    def __init__(self, coef: float, target: float, horizon: int):
        super().__init__(coef)
        if target <= 0 or horizon <= 0:
            raise ConfigError(f"kl.target={target} and kl.horizon={horizon}: the adaptive controller needs both > 0")
        self.target, self.horizon = float(target), int(horizon)

    def update(self, kl: float, n_episodes: int) -> None:
        if not math.isfinite(kl):
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon


def kl_controller(controller: str, coef: float, target: float | None = None, horizon: int = 10000,
                  estimator: str = "k1") -> FixedKL:
    """The KL coefficient's controller from the `kl` config group; also checks `kl.estimator`, so that a typo stops
    the run before any model is loaded rather than at the first rollout."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"kl.estimator={estimator!r}: use one of {', '.join(ESTIMATORS)}")
    if controller == "fixed":
        return FixedKL(coef)
    if controller == "adaptive":
        if target is None:
            raise ConfigError("kl.controller=adaptive needs kl.target=<nats per sequence> (or use kl=adaptive, which "
                              "sets one)")
        return AdaptiveKL(coef, target, horizon)
    raise ConfigError(f"kl.controller={controller!r}: use fixed or adaptive")


KL_KEYS = ("controller", "coef", "target", "horizon", "estimator")


def kl_controller_from(kl) -> FixedKL:
    """`kl_controller` from the `kl` config group (a mapping of `KL_KEYS`; any other key, e.g. a misspelt
    `+kl.coeff=`, is refused)."""
    refuse_unknown_keys("kl", kl, KL_KEYS)
    coef = checked_number("kl.coef", kl.get("coef", 0.05), at_least=0,
                          note="0: no penalty; a negative one would reward drifting from the reference")
    target = checked_number("kl.target", kl.get("target"), allow_none=True)
    horizon = checked_number("kl.horizon", kl.get("horizon"), whole=True, allow_none=True)
    return kl_controller(str(kl.get("controller", "fixed")), coef, target, 10000 if horizon is None else horizon,
                         str(kl.get("estimator", "k1")))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked entries."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)
