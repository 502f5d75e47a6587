"""The arithmetic of RL from feedback against hand computations (framework/rl.py)."""

import math

import pytest
import torch

from framework.errors import ConfigError
from framework.rl import (
    AdaptiveKL,
    FixedKL,
    explained_variance,
    gae,
    kl_controller,
    kl_controller_from,
    kl_estimate,
    last_index,
    token_logprobs,
    token_logprobs_and_entropy,
    token_rewards,
    whiten,
)


def test_score_goes_to_the_last_real_token_with_the_kl_penalty_everywhere():
    # the N-implementation-details example: three response tokens, the score added at the last one
    logp = torch.tensor([[-3.3213, -4.9980, -3.8690]])
    ref = torch.tensor([[-3.0, -5.0, -4.0]])
    beta, score = 0.1, 2.5
    kl = kl_estimate(logp, ref, "k1")
    rewards = token_rewards(torch.tensor([score]), kl, torch.ones(1, 3), beta)
    expected = [-beta * (-3.3213 + 3.0), -beta * (-4.9980 + 5.0), -beta * (-3.8690 + 4.0) + score]
    assert rewards[0].tolist() == pytest.approx(expected, abs=1e-6)
    # an early stop: the score sits on the stop token, padding after it gets nothing
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    r = token_rewards(torch.tensor([1.0, 2.0]), torch.ones(2, 4), mask, beta=0.5)
    assert r.tolist() == [[-0.5, 0.5, 0.0, 0.0], [-0.5, -0.5, -0.5, 1.5]]
    assert last_index(mask).tolist() == [1, 3]


def hand_gae(rewards, values, gamma, lam):
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        nxt = values[t + 1] if t + 1 < len(rewards) else 0.0
        last = rewards[t] + gamma * nxt - values[t] + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_matches_a_hand_loop_and_ignores_padding():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0], [0.5, 2.0, 9.0, 9.0]])
    values = torch.tensor([[0.2, 0.1, -0.1, 0.4], [0.3, 0.6, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert adv[0].tolist() == pytest.approx(hand_gae([0.1, -0.2, 0.3, 1.0], [0.2, 0.1, -0.1, 0.4], 1.0, 0.95))
    assert adv[1, :2].tolist() == pytest.approx(hand_gae([0.5, 2.0], [0.3, 0.6], 1.0, 0.95))
    assert adv[1, 2:].tolist() == [0.0, 0.0] and ret[1, 2:].tolist() == [0.0, 0.0]
    assert ret[0].tolist() == pytest.approx((adv[0] + values[0]).tolist())
    adv9, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.5)
    assert adv9[0].tolist() == pytest.approx(hand_gae([0.1, -0.2, 0.3, 1.0], [0.2, 0.1, -0.1, 0.4], 0.9, 0.5))


def test_whiten_over_the_mask():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = whiten(x, mask)
    assert w[0, :3].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w[0, :3].pow(2).mean().item() == pytest.approx(1.0, rel=1e-5)  # biased variance, as tf.moments
    assert w[0, 3].item() == 0.0
    kept = whiten(x, mask, shift_mean=False)
    assert kept[0, :3].mean().item() == pytest.approx(2.0, rel=1e-5)


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    logr = logp - ref
    assert kl_estimate(logp, ref, "k1").tolist() == pytest.approx(logr.tolist())
    assert kl_estimate(logp, ref, "k2").tolist() == pytest.approx((0.5 * logr**2).tolist())
    k3 = kl_estimate(logp, ref, "k3")
    assert k3.tolist() == pytest.approx((torch.exp(-logr) - 1 + logr).tolist()) and (k3 >= 0).all()
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k9")


def test_logprobs_use_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 0.0, -1.0]]])
    tok = torch.tensor([[0]])
    for temp in (1.0, 0.7):
        z = [2.0 / temp, 0.0, -1.0 / temp]
        expected = z[0] - math.log(sum(math.exp(v) for v in z))
        assert token_logprobs(logits, tok, temp).item() == pytest.approx(expected, rel=1e-6)


def test_fused_logprobs_and_entropy_match_autograd():
    """The update's log-probs and entropy come from one hand-written autograd function: its values and its
    gradient (at two temperatures, a bfloat16 input upcast) must be those of plain log-softmax + gather."""
    torch.manual_seed(0)
    tok = torch.randint(0, 11, (3, 5))
    for temp in (1.0, 0.7):
        x = torch.randn(3, 5, 11, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(lambda z: token_logprobs_and_entropy(z, tok, temp)[0], (x,))
        assert torch.autograd.gradcheck(lambda z: token_logprobs(z, tok, temp), (x,))
        logp, entropy = token_logprobs_and_entropy(x, tok, temp)
        probs = torch.softmax(x / temp, -1)
        plain = torch.log_softmax(x / temp, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        assert torch.allclose(logp, plain)
        assert torch.allclose(token_logprobs(x, tok, temp), plain)
        with torch.no_grad():  # a frozen reference: no probabilities kept, the same values
            assert torch.allclose(token_logprobs(x, tok, temp), plain)
        assert torch.allclose(entropy, -(probs * probs.log()).sum(-1))
        assert not entropy.requires_grad
    half = torch.randn(2, 4, 11).bfloat16().requires_grad_()
    logp, _ = token_logprobs_and_entropy(half, tok[:2, :4], 1.0)
    assert logp.dtype == torch.float32
    logp.sum().backward()
    assert half.grad.dtype == torch.bfloat16


def test_kl_controllers():
    fixed = FixedKL(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    adaptive = AdaptiveKL(0.2, target=6.0, horizon=10000)
    adaptive.update(12.0, 512)  # error clipped to +0.2
    assert adaptive.value == pytest.approx(0.2 * (1 + 0.2 * 512 / 10000))
    adaptive.update(5.4, 1000)  # error -0.1
    assert adaptive.value == pytest.approx(0.2 * (1 + 0.2 * 512 / 10000) * (1 - 0.1 * 0.1))
    state = adaptive.state_dict()
    other = kl_controller("adaptive", 1.0, 6.0, 10000)
    other.load_state_dict(state)
    assert other.value == adaptive.value
    with pytest.raises(ConfigError, match="kl.controller=adaptive needs kl.target"):
        kl_controller("adaptive", 0.1)
    with pytest.raises(ConfigError, match="kl.controller='adaptve': use fixed or adaptive"):
        kl_controller("adaptve", 0.1)
    with pytest.raises(ConfigError, match="kl.estimator='k4'"):
        kl_controller("fixed", 0.1, estimator="k4")
    with pytest.raises(ConfigError, match="kl.target=-1.0 and kl.horizon=10000"):
        kl_controller("adaptive", 0.1, -1.0)
    from_config = kl_controller_from({"controller": "adaptive", "coef": 0.1, "target": 6, "horizon": None,
                                      "estimator": "k3"})
    assert isinstance(from_config, AdaptiveKL) and from_config.target == 6.0 and from_config.horizon == 10000
    with pytest.raises(ConfigError, match="kl.horizon=0"):
        kl_controller_from({"controller": "adaptive", "target": 6, "horizon": 0})
    # values of the wrong kind, by key; a negative coefficient would reward drifting from the reference
    with pytest.raises(ConfigError, match=r"kl.coef=-1 must be >= 0 \(0: no penalty; a negative one would reward"):
        kl_controller_from({"controller": "fixed", "coef": -1})
    with pytest.raises(ConfigError, match=r"kl.coef='abc' is not a finite number"):
        kl_controller_from({"controller": "fixed", "coef": "abc"})
    with pytest.raises(ConfigError, match=r"kl.horizon=2.5 must be a whole number"):
        kl_controller_from({"controller": "adaptive", "target": 6, "horizon": 2.5})
    with pytest.raises(ConfigError, match=r"kl.target='six' is not a finite number"):
        kl_controller_from({"controller": "adaptive", "target": "six"})


@pytest.mark.parametrize("overrides, kind, coef, target", [
    (["kl=adaptive"], AdaptiveKL, 0.15, 6.0),                                         # the preset, its own defaults
    (["kl.controller=adaptive", "kl.target=6"], AdaptiveKL, 0.05, 6.0),                # kl=fixed's coef kept
    (["kl=fixed", "kl.coef=0.1"], FixedKL, 0.1, None),
])
def test_the_kl_group_as_the_command_line_composes_it(overrides, kind, coef, target):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rlhf_conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["stage=rl", *overrides])
    controller = kl_controller_from(cfg.stage.kl)
    assert type(controller) is kind and controller.value == coef and getattr(controller, "target", None) == target


def test_a_misspelt_kl_key_is_refused_not_ignored():
    """`+kl.coeff=0.1` used to leave the coefficient at kl=fixed's 0.05; it is refused with the closest key."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="rlhf_conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["stage=rl", "+kl.coeff=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key kl\.coeff \(did you mean kl\.coef\?\): kl takes coef, "
                                          r"controller, estimator, horizon, target"):
        kl_controller_from(cfg.stage.kl)
    with pytest.raises(ConfigError, match=r"unknown keys kl\.location, kl\.horizn \(did you mean kl\.horizon\?\)"):
        kl_controller_from({"controller": "fixed", "coef": 0.1, "location": "reward", "horizn": 10})


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(returns) + 2.0, returns, mask).item() == pytest.approx(0.0, abs=1e-6)
