"""Policy algorithms on hand-made rollouts: what each turns a rollout into, and its loss."""

import pytest
import torch

from framework.errors import ConfigError
from framework.interfaces import Rollout
from framework.rl import gae, token_rewards, whiten
from plugins.algorithms.group import GRPO, RLOO, Reinforce
from plugins.algorithms.ppo import PPO


def rollout(scores, group=1, values=True, t=3):
    b = len(scores)
    torch.manual_seed(0)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, -1] = 0  # an early stop in the first sample
    logp = -torch.rand(b, t)
    return Rollout(prompts=[None] * b, texts=[""] * b, query_ids=torch.zeros(b, 2, dtype=torch.long),
                   query_mask=torch.ones(b, 2, dtype=torch.long), response_ids=torch.zeros(b, t, dtype=torch.long),
                   response_mask=mask, logprobs=logp, ref_logprobs=logp - 0.1,
                   values=torch.rand(b, t) if values else None, scores=torch.tensor(scores, dtype=torch.float),
                   raw_scores=torch.tensor(scores, dtype=torch.float), ended=torch.ones(b, dtype=torch.bool),
                   group_size=group)


def test_ppo_experience_and_the_first_minibatch():
    roll = rollout([1.0, -0.5, 0.3, 2.0])
    ppo = PPO()
    exp = ppo.make_experience(roll, kl_coef=0.2, kl_estimator="k1")
    mask = roll.response_mask
    kl = (roll.logprobs - roll.ref_logprobs) * mask
    rewards = token_rewards(roll.scores, kl, mask, 0.2)
    adv, ret = gae(rewards, roll.values, mask, 1.0, 0.95)
    assert torch.allclose(exp["returns"], ret)  # returns from the raw advantages, before whitening
    assert torch.allclose(exp["advantages"], whiten(adv, mask))
    assert torch.allclose(exp["seq_kl"], torch.full((4,), 0.1) * mask.sum(-1))
    loss, m = ppo.loss(roll.logprobs.clone().requires_grad_(), roll.values.clone().requires_grad_(), exp)
    assert m["policy/ratio"].item() == pytest.approx(1.0) and m["policy/clipfrac"].item() == 0.0
    assert m["policy/approxkl"].item() == 0.0 and m["val/clipfrac"].item() == 0.0
    loss.backward()


def test_ppo_clips_the_ratio_and_the_value():
    roll = rollout([1.0, -0.5, 0.3, 2.0])
    ppo = PPO(clip=0.2, value_clip=0.2)
    exp = ppo.make_experience(roll, 0.0, "k1")
    moved = roll.logprobs + 0.5  # ratio e^0.5 = 1.65 everywhere
    _, m = ppo.loss(moved, roll.values + 1.0, exp)
    positive = (exp["advantages"] > 0) & roll.response_mask.bool()
    assert m["policy/clipfrac"].item() == pytest.approx(positive.sum().item() / roll.response_mask.sum().item())
    assert m["val/clipfrac"].item() > 0


def test_grpo_group_advantages_and_kl_term():
    roll = rollout([1.0, 0.0, 3.0, 3.0], group=2, values=False)
    grpo = GRPO(generations=2, beta=0.1)
    exp = grpo.make_experience(roll, kl_coef=0.5, kl_estimator="k1")
    g = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    expected = ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + 1e-4)).reshape(-1)
    assert torch.allclose(exp["advantages"][:, 0], expected)
    assert exp["advantages"][0, -1] == 0.0  # padding after the early stop
    loss, m = grpo.loss(roll.logprobs, None, exp)
    k3 = torch.exp(torch.tensor(-0.1)) - 1 + 0.1
    assert m["loss/kl"].item() == pytest.approx(k3.item(), rel=1e-4)
    assert loss.item() == pytest.approx(m["loss/policy"].item() + 0.1 * m["loss/kl"].item(), rel=1e-5)
    # the loss term's estimator is algo.kl_estimator, whatever kl.estimator the logged KL uses
    k2 = GRPO(generations=2, beta=0.1, kl_estimator="k2")
    _, m2 = k2.loss(roll.logprobs, None, k2.make_experience(roll, kl_coef=0.5, kl_estimator="k3"))
    assert m2["loss/kl"].item() == pytest.approx(0.5 * 0.1 ** 2, rel=1e-4)
    with pytest.raises(ConfigError, match="algo.kl_estimator='k4'"):
        GRPO(generations=2, kl_estimator="k4")
    with pytest.raises(ConfigError, match="generations >= 2"):
        GRPO(generations=1)


def test_rloo_leave_one_out_baseline():
    roll = rollout([1.0, 2.0, 6.0, 0.0, 0.0, 0.0], group=3, values=False)
    exp = RLOO(generations=3).make_experience(roll, kl_coef=0.0, kl_estimator="k1")
    assert exp["advantages"][:3, 0].tolist() == pytest.approx([1 - 4.0, 2 - 3.5, 6 - 1.5])
    assert exp["advantages"][3:, 0].tolist() == pytest.approx([0.0, 0.0, 0.0])
    with_kl = RLOO(generations=3).make_experience(roll, kl_coef=1.0, kl_estimator="k1")
    seq_kl = with_kl["seq_kl"]
    r = torch.tensor([1.0, 2.0, 6.0]) - seq_kl[:3]
    assert with_kl["advantages"][1, 0].item() == pytest.approx((r[1] - (r[0] + r[2]) / 2).item(), rel=1e-5)


def test_reinforce_moving_baseline_and_its_state():
    algo = Reinforce(baseline_decay=0.5)
    first = algo.make_experience(rollout([1.0, 3.0]), 0.0, "k1")
    assert first["advantages"][:, 0].tolist() == pytest.approx([-1.0, 1.0])  # first baseline = batch mean
    assert algo.baseline == pytest.approx(2.0)
    second = algo.make_experience(rollout([4.0, 4.0]), 0.0, "k1")
    assert second["advantages"][:, 0].tolist() == pytest.approx([2.0, 2.0])
    other = Reinforce()
    other.load_state_dict(algo.state_dict())
    assert other.baseline == pytest.approx(0.5 * 2.0 + 0.5 * 4.0)


def test_dpo_and_ipo_losses_by_hand():
    import math

    from plugins.algorithms.dpo import DPO
    from framework.stages.preference import sequence_logps

    pc, pr, rc, rr = torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.5])
    h = (-5.0 + 6.0) - (-7.0 + 6.5)  # 1.5
    loss, m = DPO(beta=0.1).loss(pc, pr, rc, rr)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1 * h)), rel=1e-6)
    assert m["rewards/margins"].item() == pytest.approx(0.15) and m["rewards/accuracies"].item() == 1.0
    smooth, _ = DPO(beta=0.1, label_smoothing=0.2).loss(pc, pr, rc, rr)
    expected = 0.8 * math.log1p(math.exp(-0.15)) + 0.2 * math.log1p(math.exp(0.15))
    assert smooth.item() == pytest.approx(expected, rel=1e-6)
    ipo = DPO(beta=0.5, loss_type="ipo")
    assert ipo.average_logprobs and ipo.loss(pc, pr, rc, rr)[0].item() == pytest.approx((h - 1.0) ** 2)
    # at beta 0.5 the target 1 / (2 beta) = 1 and a wrong 1 / beta = 2 are as far from h = 1.5: beta 0.25 tells them
    # apart (target 2, not 4)
    assert DPO(beta=0.25, loss_type="ipo").loss(pc, pr, rc, rr)[0].item() == pytest.approx((h - 2.0) ** 2)
    # summed log-probs of the labelled (response) tokens only: logits at t predict labels at t + 1
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    labels = torch.tensor([[-100, 0, 1]])
    assert sequence_logps(logits, labels).item() == pytest.approx(math.log(0.5) + math.log(0.1), rel=1e-5)
    assert sequence_logps(logits, labels, average=True).item() == pytest.approx((math.log(0.5) + math.log(0.1)) / 2)


def test_ppo_losses_by_hand():
    """The clipped policy loss (the max of the two surrogates' losses), the clipped value loss (the max of the two
    squared errors, clipped around the rollout's values), vf_coef and approx KL (1/2 the mean squared log-ratio),
    against a hand computation with every ratio e^0.5 (outside the clip range) and every value moved by +1."""
    roll = rollout([1.0, -0.5, 0.3, 2.0])
    ppo = PPO(clip=0.2, value_clip=0.2, vf_coef=0.1)
    exp = ppo.make_experience(roll, 0.0, "k1")
    adv, ret, mask = exp["advantages"], exp["returns"], roll.response_mask.float()

    def mean(x):
        return ((x * mask).sum() / mask.sum()).item()

    ratio = torch.exp(torch.tensor(0.5))
    loss, m = ppo.loss(roll.logprobs + 0.5, roll.values + 1.0, exp)
    policy = mean(torch.max(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2)))
    value = 0.5 * mean(torch.max((roll.values + 1.0 - ret) ** 2, (roll.values + 0.2 - ret) ** 2))
    assert m["loss/policy"].item() == pytest.approx(policy, rel=1e-5)
    assert m["loss/value"].item() == pytest.approx(value, rel=1e-5)
    assert loss.item() == pytest.approx(policy + 0.1 * value, rel=1e-5)
    assert m["policy/approxkl"].item() == pytest.approx(0.5 * 0.5 ** 2, rel=1e-6)


def test_ppo_whiten_rewards_scales_without_shifting_the_mean():
    roll = rollout([1.0, -0.5, 0.3, 2.0])
    exp = PPO(whiten_rewards=True).make_experience(roll, 0.2, "k1")
    mask = roll.response_mask
    rewards = whiten(token_rewards(roll.scores, (roll.logprobs - roll.ref_logprobs) * mask, mask, 0.2), mask,
                     shift_mean=False)
    assert torch.allclose(exp["returns"], gae(rewards, roll.values, mask, 1.0, 0.95)[1])
