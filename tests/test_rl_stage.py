"""The RL stage's module on a tiny policy: dropout stays off, the first minibatch has ratio 1, rollouts mask and
place tokens right with left-padded prompts, non-finite rewards stop the run with the samples saved."""


import copy
import json

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from framework.data import ListDataset
from framework.errors import ConfigError, RLHFError
from framework.imitation import encode_prompt
from framework.interfaces import RewardFunction
from framework.models import CausalLMFactory, RatesOff, count_parameters
from framework.records import Prompt
from framework.rollout import SamplingSettings
from framework.reward import NonFiniteReward
from framework.stages.rl import (PolicyWithValue, RLModule, RLStage, disable_dropout, response_positions,
                                stop_mask, trim_left_padding, written_mid_iteration)
from framework.rl import token_logprobs
from plugins.algorithms.group import GRPO, Reinforce
from plugins.algorithms.ppo import PPO

PROMPTS = [Prompt(t) for t in ["hi there", "what do you do for fun?", "hello", "how was your day today?"]]


def tiny_lm(tokenizer, seed=0):
    torch.manual_seed(seed)
    return CausalLMFactory(arch="gpt2", n_layer=1, n_head=2, n_embd=32, n_positions=64, resid_pdrop=0.1,
                           embd_pdrop=0.1, attn_pdrop=0.1).build(tokenizer)


class Length(RewardFunction):
    def score(self, prompts, completions):
        return [len(c) / 10 for c in completions]


class Broken(RewardFunction):
    def __init__(self, bad=float("nan")):
        self.bad = bad

    def score(self, prompts, completions):
        return [self.bad] + [0.0] * (len(completions) - 1)


def module(tokenizer, algorithm, reward, tmp_path, updates=8, reward_clip=None, kl=None, **kwargs):
    lm = tiny_lm(tokenizer)
    reference = tiny_lm(tokenizer)
    reference.load_state_dict(lm.state_dict())
    for m in (lm, reference):
        disable_dropout(m)
    return RLModule(PolicyWithValue(lm, algorithm.needs_value), reference.eval(), tokenizer, algorithm, reward,
                    kl or {"controller": "fixed", "coef": 0.05, "estimator": "k1"}, "chat",
                    SamplingSettings(max_new_tokens=8, temperature=0.7), {"lr": 1e-3}, {"warmup_steps": 0,
                                                                                         "min_lr_ratio": 0.0},
                    updates, no_eos_penalty=1.0, reward_clip=reward_clip, gradient_clip=1.0, sample_dir=tmp_path,
                    **kwargs)


def fit(mod, iterations=2):
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    loader = DataLoader(ListDataset(PROMPTS * iterations), batch_size=len(PROMPTS), collate_fn=list)
    trainer.fit(mod, train_dataloaders=loader)
    return trainer


def test_dropout_stays_off_and_the_first_minibatch_is_on_policy(tokenizer, tmp_path):
    mod = module(tokenizer, PPO(epochs=2, minibatches=2), Length(), tmp_path)
    active = []
    dropouts = [m for net in (mod.policy, mod.reference) for m in net.modules() if isinstance(m, nn.Dropout)]
    assert dropouts  # the config asked for dropout 0.1: there is something to switch off
    for m in dropouts:
        m.register_forward_pre_hook(lambda m, args: active.append(m.training and m.p > 0))
    trainer = fit(mod)
    assert mod.iteration == 2 and not any(active) and len(active) > 0
    assert mod.policy.training  # Lightning did put the module in train mode; p = 0 kept dropout off anyway
    metrics = trainer.callback_metrics
    assert metrics["first_minibatch/policy/ratio"].item() == pytest.approx(1.0, abs=1e-6)
    assert metrics["first_minibatch/policy/approxkl"].item() == pytest.approx(0.0, abs=1e-10)
    assert metrics["first_minibatch/policy/clipfrac"].item() == 0.0
    for key in ("objective/kl", "objective/kl_coef", "objective/entropy", "loss/policy", "loss/value",
                "val/var_explained", "val/clipfrac", "response/length", "response/eos_fraction", "episodes_per_s",
                "time/generation_s", "time/training_s"):
        assert key in metrics, key


def forwards_agree(model, ids) -> bool:
    """Two forwards in train mode give the same output: no dropout is active."""
    model.train()
    with torch.no_grad():
        first, second = (model(input_ids=ids)[0] for _ in range(2))
    return torch.equal(first, second)


def test_dropout_goes_off_also_where_a_layer_keeps_its_rate_as_a_number(tokenizer):
    """Llama-family attention keeps `attention_dropout` as a float and applies it in train mode, with no nn.Dropout
    module to switch off; the rate saved in the config is left alone (an export keeps it)."""
    ids = torch.tensor([tokenizer("hello there, how was your day?")["input_ids"]])
    torch.manual_seed(0)
    llama = CausalLMFactory(arch="llama", num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                            hidden_size=32, intermediate_size=64, max_position_embeddings=64,
                            attention_dropout=0.5).build(tokenizer)
    gpt2 = tiny_lm(tokenizer)
    for model in (llama, gpt2):
        assert not forwards_agree(model, ids)  # the rates are live to begin with
        assert disable_dropout(model) is model
        assert forwards_agree(model, ids)
    assert llama.config.attention_dropout == 0.5 and gpt2.config.attn_pdrop == 0.1
    # their layers keep the real config: nothing of theirs reads a rate from it (a view would only slow each read)
    assert not any(isinstance(getattr(m, "config", None), RatesOff) for m in (*llama.modules(), *gpt2.modules()))
    others = nn.Sequential(nn.Dropout1d(0.5), nn.AlphaDropout(0.5), nn.FeatureAlphaDropout(0.5))
    assert all(m.p == 0.0 for m in disable_dropout(others))


def test_dropout_goes_off_where_a_layer_reads_its_rate_from_the_config(tmp_path):
    """Falcon's decoder layer and attention read `config.hidden_dropout` / `attention_dropout` at every forward:
    they get a view of the config with the rates at 0, while the model's config (the one an export saves) keeps
    them, and a later change to the config (the attention implementation) still reaches the layers."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    falcon = FalconForCausalLM(FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            hidden_dropout=0.5, attention_dropout=0.5))
    ids = torch.randint(0, 64, (2, 12))
    assert not forwards_agree(falcon, ids)
    disable_dropout(falcon)
    assert forwards_agree(falcon, ids)
    assert forwards_agree(copy.deepcopy(falcon), ids)  # the reference policy is a deep copy
    falcon.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["hidden_dropout"], saved["attention_dropout"]) == (0.5, 0.5)
    layer = falcon.transformer.h[0]
    assert isinstance(layer.config, RatesOff)  # the decoder layer reads config.hidden_dropout in its forward
    falcon.config._attn_implementation = "eager"
    assert layer.config._attn_implementation == layer.self_attention.config._attn_implementation == "eager"
    assert forwards_agree(falcon, ids)


def test_the_stage_loads_policy_reference_reward_model_and_critic_with_dropout_off(tokenizer, tmp_path):
    """What `stage=rl` loads itself (not what a test switched off): the policy and its reference, a learned reward
    and a separate critic from a reward model, from dirs whose configs ask for dropout."""
    from omegaconf import OmegaConf

    from framework.reward import RewardModel, export_reward_model
    from framework.stages.common import export_causal_lm
    from plugins.reward_heads.heads import LastToken
    from plugins.rewards.learned import LearnedReward

    ids = torch.tensor([tokenizer("hello there, how was your day?")["input_ids"]])
    torch.manual_seed(0)
    llama = CausalLMFactory(arch="llama", num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                            hidden_size=32, intermediate_size=64, max_position_embeddings=64,
                            attention_dropout=0.5).build(tokenizer)
    policy_dir = export_causal_lm(llama, tokenizer, tmp_path / "policy")
    _, lm, reference = RLStage.load_policy(str(policy_dir))
    assert lm.config.attention_dropout == 0.5
    assert forwards_agree(lm, ids) and forwards_agree(reference, ids)

    head = LastToken()
    rm = RewardModel.from_causal_lm(tiny_lm(tokenizer), head)
    rm_dir = export_reward_model(rm, head, {"_target_": "plugins.reward_heads.heads.LastToken"}, tokenizer,
                                 tmp_path / "rm", {"format": "plain", "max_length": 64})
    reward = LearnedReward(str(rm_dir), allow_unnormalized=True)
    # scoring switches to eval mode anyway; the model itself must have no live dropout left, whatever the mode
    reward.model.train()
    with torch.no_grad():
        assert torch.equal(*(reward.model(ids, torch.ones_like(ids)) for _ in range(2)))
    cfg = OmegaConf.create({"reward": {}})
    trunk, _ = RLStage.separate_critic(cfg, PPO(critic="separate", critic_path=str(rm_dir)), tokenizer)
    trunk.train()
    with torch.no_grad():
        assert torch.equal(*(trunk(input_ids=ids).last_hidden_state for _ in range(2)))


def test_the_latest_evaluation_is_part_of_the_checkpoint(tokenizer, tmp_path):
    """A run resumed at its last iteration, which was evaluated, reuses that evaluation instead of sampling again."""
    mod = module(tokenizer, PPO(epochs=1, minibatches=1), Length(), tmp_path)
    mod.last_eval = (3, {"eval/gold_reward": 0.5})
    checkpoint = {}
    mod.on_save_checkpoint(checkpoint)
    resumed = module(tokenizer, PPO(epochs=1, minibatches=1), Length(), tmp_path)
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.last_eval == (3, {"eval/gold_reward": 0.5}) and resumed.iteration == mod.iteration


def test_the_kl_estimator_setting_reaches_the_algorithm(tokenizer, tmp_path):
    seen = []

    class Recording(PPO):
        def make_experience(self, rollout, kl_coef, kl_estimator):
            seen.append((kl_coef, kl_estimator))
            return super().make_experience(rollout, kl_coef, kl_estimator)

    mod = module(tokenizer, Recording(epochs=1, minibatches=1), Length(), tmp_path,
                 kl={"controller": "fixed", "coef": 0.2, "estimator": "k3"})
    fit(mod, iterations=1)
    assert seen == [(0.2, "k3")]


def test_rollout_masks_after_the_stop_and_scores_with_left_padded_prompts(tokenizer, tmp_path):
    mod = module(tokenizer, GRPO(generations=2), Length(), tmp_path)
    torch.manual_seed(1)
    roll = mod.rollout(PROMPTS)
    assert roll.response_ids.size(0) == 8 and roll.query_mask[:, 0].sum() < 8  # prompts of different lengths
    for ids, mask, ended in zip(roll.response_ids, roll.response_mask, roll.ended):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        if ended:
            assert ids[n - 1] == mod.stop_id and (ids[n:] == tokenizer.pad_token_id).all()
    # no-EOS penalty applied to the responses that never stopped
    assert torch.allclose(roll.scores, roll.raw_scores - 1.0 * (~roll.ended).float())
    # log-probs of a left-padded row equal those of the same sequence alone (position ids count real tokens)
    i = int(roll.query_mask.sum(-1).argmin())
    alone_q = torch.tensor([encode_prompt(tokenizer, roll.prompts[i].text, "chat")])
    n = int(roll.response_mask[i].sum())
    ids = torch.cat([alone_q, roll.response_ids[i : i + 1, :n]], 1)
    logits, _ = mod.policy(ids, torch.ones_like(ids))
    alone = token_logprobs(response_positions(logits, n), roll.response_ids[i : i + 1, :n], 0.7)
    assert torch.allclose(alone[0], roll.logprobs[i, :n], atol=1e-5)
    assert torch.allclose(roll.logprobs[i, :n], roll.ref_logprobs[i, :n], atol=1e-6)  # policy == reference at start


def test_reward_clipping_applies_before_the_no_eos_penalty_and_keeps_the_raw_scores(tokenizer, tmp_path):
    """The source's score is clipped, then a response that never stopped pays the penalty: clipping after it would
    hand a long unfinished response the same score as a finished one."""
    mod = module(tokenizer, GRPO(generations=2), Length(), tmp_path, reward_clip=0.3)
    torch.manual_seed(1)
    roll = mod.rollout(PROMPTS)
    unfinished = (~roll.ended).float()
    expected = roll.raw_scores.clamp(-0.3, 0.3) - 1.0 * unfinished
    assert (roll.raw_scores.abs() > 0.3).any()  # there is something to clip
    assert not torch.equal(expected, (roll.raw_scores - unfinished).clamp(-0.3, 0.3))  # the order shows here
    assert torch.equal(roll.scores, expected)


@pytest.mark.parametrize("key, value", [("reward_clip", 0.0), ("reward_clip", -2.0), ("no_eos_penalty", -1.0)])
def test_a_reward_clip_or_no_eos_penalty_that_would_invert_its_meaning_is_refused(key, value):
    with pytest.raises(ConfigError, match=f"stage.{key}={value}"):
        RLStage(**{key: value})


class Returns(RewardFunction):
    def __init__(self, value):
        self.value = value

    def score(self, prompts, completions):
        return self.value(completions) if callable(self.value) else self.value


@pytest.mark.parametrize("returned, problem", [
    (0.5, "returned a float"),
    (lambda c: [0.0] * (len(c) - 1), "returned 3 scores"),
    (lambda c: [None] * len(c), "returned None"),
    (lambda c: ["0.5"] * len(c), "returned '0.5'"),
    (lambda c: torch.zeros(len(c), 2), "returned a tensor of shape"),
])
def test_a_reward_source_that_breaks_its_contract_is_named(tokenizer, tmp_path, returned, problem):
    mod = module(tokenizer, PPO(epochs=1, minibatches=1), Returns(returned), tmp_path)
    with pytest.raises(RLHFError, match=f"reward source Returns {problem}.*one real number per completion"):
        mod.rollout(PROMPTS)


def test_scores_as_a_tensor_array_or_numbers_are_accepted(tokenizer, tmp_path):
    import numpy as np

    from framework.reward import reward_scores

    for returned in (torch.arange(4.0), np.arange(4.0), [0, 1, 2.0, np.float32(3)], [torch.tensor(float(i)) for i in range(4)]):
        assert reward_scores(Length(), returned, 4).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_prompts_longer_than_the_context_allows_are_cut_from_the_left(tokenizer, tmp_path):
    """The tiny policy's context is 64 tokens; with 8 new tokens a prompt keeps its last 56 (its end, where the
    chat template asks for the reply). Uncut, the positions past 64 would not exist."""
    long = Prompt("tell me about your day, " * 30)
    mod = module(tokenizer, GRPO(generations=2), Length(), tmp_path, context=64)
    full = encode_prompt(tokenizer, long.text, "chat")
    assert len(full) > 64
    assert mod.encode(long.text) == full[-56:] and mod.encode.truncated == 1
    roll = mod.rollout([long, *PROMPTS[:3]])
    assert roll.query_ids.size(1) == 56 and roll.query_ids.size(1) + roll.response_ids.size(1) <= 64


def test_a_minibatch_drops_only_the_left_padding_all_its_rows_share(tokenizer, tmp_path):
    mod = module(tokenizer, PPO(epochs=1, minibatches=2), Length(), tmp_path)
    torch.manual_seed(1)
    roll = mod.rollout(PROMPTS)
    ids = torch.cat([roll.query_ids, roll.response_ids], 1)
    mask = torch.cat([roll.query_mask, roll.response_mask], 1)
    rows = roll.query_mask.sum(-1).argsort()[:2]  # the two shortest prompts: some padding shared
    full_ids, full_mask = ids[rows], mask[rows]
    shared = int(roll.query_mask.size(1) - roll.query_mask[rows].sum(-1).max())
    assert shared > 0
    cut_ids, cut_mask = trim_left_padding(full_ids, full_mask)
    assert cut_ids.size(1) == full_ids.size(1) - shared and cut_mask[:, 0].any()
    length = roll.response_ids.size(1)
    assert torch.equal(cut_ids[:, -length:], full_ids[:, -length:])  # the response columns are untouched
    with torch.no_grad():
        (a, va), (b, vb) = mod.policy(full_ids, full_mask, length), mod.policy(cut_ids, cut_mask, length)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(va, vb, atol=1e-6)
    assert trim_left_padding(ids, mask)[0].size(1) == ids.size(1)  # the longest prompt has no padding: kept


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_reward_stops_with_the_samples_saved(tokenizer, tmp_path, bad):
    mod = module(tokenizer, PPO(epochs=1, minibatches=1), Broken(bad), tmp_path)
    before = {k: v.clone() for k, v in mod.policy.state_dict().items()}
    with pytest.raises(NonFiniteReward, match="NaN/inf for 1 of 4"):
        mod.rollout(PROMPTS)
    saved = list(tmp_path.glob("nonfinite_rewards_iter0.jsonl"))
    assert saved and f'"reward": "{bad}"' in saved[0].read_text()
    assert all(torch.equal(before[k], v) for k, v in mod.policy.state_dict().items())


def test_the_inverse_cdf_sampler_samples_the_tempered_distribution(tokenizer):
    """Sampling from the full distribution goes through InverseCDFSampler + greedy decoding: the frequencies match
    softmax(logits / T), processors before it still apply (min_new_tokens), and a seed fixes the draw."""
    import torch

    from framework.rollout import HFGenerator, InverseCDFSampler

    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(100_000, 1)
    torch.manual_seed(0)
    picks = InverseCDFSampler(0.7)(None, logits).argmax(-1)
    freq = torch.bincount(picks, minlength=4).double() / picks.numel()
    assert torch.allclose(freq, torch.softmax(logits[0].double() / 0.7, -1), atol=0.005)

    lm = tiny_lm(tokenizer)
    gen = HFGenerator(lm, tokenizer, [tokenizer.eos_token_id])
    prompts = [tokenizer("hello there")["input_ids"]] * 8
    settings = SamplingSettings(max_new_tokens=6, min_new_tokens=6, temperature=1.3)
    torch.manual_seed(3)
    first = gen.generate_ids(prompts, settings).response_ids
    torch.manual_seed(3)
    assert torch.equal(first, gen.generate_ids(prompts, settings).response_ids)
    assert first.shape == (8, 6) and not (first == tokenizer.eos_token_id).any()
    assert len({tuple(r) for r in first.tolist()}) > 1  # sampled, not greedy


def test_response_only_logits_match_the_full_forward(tokenizer):
    """RL forwards project only the response positions onto the vocabulary (`logits_to_keep`); a model whose
    forward lacks that argument is sliced instead. Both must give the full forward's numbers, left padding and all."""
    from framework.stages.rl import causal_lm_forward, positions

    class NoKeep(nn.Module):  # a user model without logits_to_keep
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    lm = tiny_lm(tokenizer).eval()
    ids = torch.randint(3, 300, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    pos = positions(mask)
    full = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    expected = full[:, 6:11]  # positions 6..10 predict tokens 7..11
    for model in (lm, NoKeep(lm)):
        out = causal_lm_forward(model, ids, mask, pos, 5).logits
        assert out.shape == (3, 5, full.size(-1)) and torch.allclose(out, expected, atol=1e-6)
    policy = PolicyWithValue(lm, value_head=True)
    torch.nn.init.normal_(policy.value.weight)  # zero at init: any slice would match
    logits, values = policy(ids, mask, 5)
    all_logits, all_values = policy(ids, mask)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(values, all_values[:, 6:11]) and values.abs().sum() > 0
    trunk = tiny_lm(tokenizer, seed=1).transformer.eval()  # a separate critic's trunk
    critic = PolicyWithValue(lm, value_head=True, critic=(trunk, nn.Linear(32, 1)))
    values, all_values = critic(ids, mask, 5)[1], critic(ids, mask)[1]
    assert torch.allclose(values, all_values[:, 6:11]) and values.abs().sum() > 0


def three_layers_and_a_padded_batch(tokenizer, arch):
    """A 3-layer GPT-2, Llama or Qwen2 (with sliding-window layers) LM (dropout off, eval mode) and a batch of 3 x 12 tokens whose first row is
    left-padded by 4: (lm, ids, mask, position ids)."""
    from framework.models import positions

    torch.manual_seed(0)
    sizes = ({"n_layer": 3, "n_head": 2, "n_embd": 32, "n_positions": 64} if arch == "gpt2" else
             {"num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 32,
              "intermediate_size": 64, "max_position_embeddings": 64})
    if arch == "qwen2":  # per-layer attention kinds: full, then sliding windows of 4 tokens
        sizes.update(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    lm = disable_dropout(CausalLMFactory(arch=arch, **sizes).build(tokenizer)).eval()
    ids = torch.randint(0, len(tokenizer), (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return lm, ids, mask, positions(mask)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_value_branch_starts_as_the_policys_top_layers_and_trains_apart(tokenizer, arch):
    """algo.value_layers=N (trlX's num_value_layers_unfrozen): the branch fed the policy's hidden state below its top
    N layers gives the policy's last hidden state at the start (left padding included); its weights are its own
    (only its layers and final norm train); the value's gradient reaches the branch and the policy's lower layers,
    never the policy's top layers nor its final norm."""
    from framework.models import value_branch

    lm, ids, mask, pos = three_layers_and_a_padded_batch(tokenizer, arch)
    out = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    layers = lm.base_model.h if arch == "gpt2" else lm.base_model.layers
    for n in (1, 2):
        branch = value_branch(lm, n)
        got = branch(inputs_embeds=out.hidden_states[-n - 1], attention_mask=mask, position_ids=pos).last_hidden_state
        real = mask.bool()
        assert torch.allclose(got[real], out.last_hidden_state[real], atol=1e-5)
        top = sum(p.numel() for layer in layers[-n:] for p in layer.parameters())
        norm = sum(p.numel() for p in (lm.base_model.ln_f if arch == "gpt2" else lm.base_model.norm).parameters())
        assert sum(p.numel() for p in branch.parameters() if p.requires_grad) == top + norm
        assert not {id(p) for p in branch.parameters()} & {id(p) for p in lm.parameters()}

    policy = PolicyWithValue(lm, value_head=True, value_layers=2)
    torch.nn.init.normal_(policy.value.weight)  # zero at init: no gradient would reach the branch
    logits, values = policy(ids, mask, 5)
    assert torch.allclose(values, policy(ids, mask)[1][:, -6:-1]) and torch.allclose(logits, lm(
        input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -6:-1], atol=1e-6)
    values.sum().backward()
    grad = lambda module: sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)  # noqa: E731
    assert grad(policy.value_branch) > 0 and grad(layers[0]) > 0
    final_norm = lm.base_model.ln_f if arch == "gpt2" else lm.base_model.norm
    assert grad(layers[1]) == grad(layers[2]) == grad(final_norm) == 0
    before = [p.detach().clone() for p in layers[-1].parameters()]
    with torch.no_grad():
        for p in policy.value_branch.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, layers[-1].parameters()))


def test_a_value_branch_that_is_wrong_or_misplaced_is_refused_with_the_fix(tokenizer):
    from framework.models import _check_branch, value_branch

    lm = tiny_lm(tokenizer)  # one layer
    with pytest.raises(ConfigError, match=r"algo.value_layers=2 must be in \[1, 1\] \(the value branch copies some of the policy's 1 layers"):
        value_branch(lm, 2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match=r"algo.value_layers=(-1 must be >= 0 \(0: the value layer|1.5 must be a whole number|True is not a finite number)"):
            PPO(value_layers=bad)
    with pytest.raises(ConfigError, match="algo.value_layers=1 is for algo.critic=shared.*set algo.value_layers=0"):
        PPO(critic="separate", value_layers=1)
    with pytest.raises(ConfigError, match="algo.critic=sepratate: use shared .* or separate"):
        PPO(critic="sepratate", value_layers=1)
    with pytest.raises(ConfigError, match="algo.value_layers is for the value head on the policy"):
        PolicyWithValue(lm, True, critic=(tiny_lm(tokenizer, 1).transformer, nn.Linear(32, 1)), value_layers=1)
    branch = value_branch(lm, 1)
    with torch.no_grad():
        branch.h[0].mlp.c_proj.weight.mul_(3.0)  # no longer the policy's top layer
    with pytest.raises(ConfigError, match="does not reproduce its last hidden state.*use algo.value_layers=0"):
        _check_branch(lm, branch, 1, "algo.value_layers")


def test_a_ppo_run_with_a_value_branch_starts_on_policy_and_checkpoints_the_branch(tokenizer, tmp_path):
    mod = module(tokenizer, PPO(epochs=2, minibatches=2), Length(), tmp_path)
    mod.policy = PolicyWithValue(mod.policy.lm, True, value_layers=1)
    start = [p.detach().clone() for p in mod.policy.value_branch.parameters()]
    metrics = fit(mod).callback_metrics
    assert metrics["first_minibatch/policy/ratio"].item() == pytest.approx(1.0, abs=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(start, mod.policy.value_branch.parameters()))
    # the position and input tables stay zero and frozen; the optimizer holds exactly the trainable parameters
    branch = mod.policy.value_branch
    assert not branch.wpe.weight.requires_grad and branch.wpe.weight.abs().sum() == 0
    assert not branch.wte.weight.requires_grad
    held = sum(p.numel() for group in mod.optimizers().optimizer.param_groups for p in group["params"])
    assert held == count_parameters(mod.policy)
    checkpoint = {"state_dict": mod.state_dict()}
    mod.on_save_checkpoint(checkpoint)
    assert checkpoint["rl_state"]["critic"] == "a value branch of 1 layer"
    assert any(k.startswith("policy.value_branch.h.0.") for k in checkpoint["state_dict"])
    resumed = module(tokenizer, PPO(epochs=2, minibatches=2), Length(), tmp_path)
    with pytest.raises(ConfigError, match="checkpoint's policy has a value branch of 1 layer and this run's has a "
                                          "value head on its last hidden state: resume with the algo.critic, "
                                          "algo.critic_layers and algo.value_layers"):
        resumed.on_load_checkpoint(checkpoint)
    resumed.policy = PolicyWithValue(resumed.policy.lm, True, value_layers=1)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(branch.parameters(), resumed.policy.value_branch.parameters()))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_a_critic_cut_to_its_bottom_layers_is_the_reward_models_final_norm_over_them(tokenizer, arch):
    """algo.critic_layers=K: the critic keeps the reward model's embeddings, bottom K layers and final norm, so its
    last hidden state is the final norm of the whole model's hidden state after K layers (left padding included);
    its config says K layers (and the kinds of those K, where it has per-layer kinds); a K it does not have, a
    decoder whose layers cannot be found, or one that fails the probe forward, is refused."""
    from framework.models import keep_bottom_layers

    lm, ids, mask, pos = three_layers_and_a_padded_batch(tokenizer, arch)
    with torch.no_grad():
        out = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    real = mask.bool()
    for k in (1, 2):
        trunk = copy.deepcopy(lm.base_model)
        norm = trunk.ln_f if arch == "gpt2" else trunk.norm
        layers = trunk.h if arch == "gpt2" else trunk.layers
        per_layer = sum(p.numel() for p in layers[0].parameters())
        before = count_parameters(trunk)
        assert keep_bottom_layers(trunk, k) is trunk
        assert trunk.config.num_hidden_layers == k and count_parameters(trunk) == before - (3 - k) * per_layer
        if arch == "qwen2":
            assert trunk.config.layer_types == lm.config.layer_types[:k] and "sliding_attention" in lm.config.layer_types
        with torch.no_grad():
            got = trunk(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            assert torch.allclose(got[real], norm(out.hidden_states[k])[real], atol=1e-5)
    assert lm.config.num_hidden_layers == 3  # the cut is the critic's own
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ConfigError, match=r"algo.critic_layers=(0 must be in \[1, 3\] \(.*of the reward model's 3 layers; null: all of them|4 must be in \[1, 3\]|1.5 must be a whole number|True is not a finite number)"):
            keep_bottom_layers(copy.deepcopy(lm.base_model), bad)
    unfindable = copy.deepcopy(lm.base_model)
    unfindable.config.num_hidden_layers = 5  # no list of 5 layers
    with pytest.raises(ConfigError,
                       match="algo.critic_layers=1: cannot find the layer list.*use algo.critic_layers=null"):
        keep_bottom_layers(unfindable, 1)
    failing = copy.deepcopy(lm.base_model)
    failing.forward = lambda **kwargs: (_ for _ in ()).throw(AttributeError("no such thing"))
    with pytest.raises(ConfigError, match=r"algo.critic_layers=1: .* ran into an error \(AttributeError: no such "
                                          r"thing\) in a probe.*use algo.critic_layers=null"):
        keep_bottom_layers(failing, 1)


def test_a_critic_cut_to_its_bottom_layers_is_built_validated_trained_and_checkpointed(tokenizer, tmp_path):
    """algo=ppo algo.critic=separate algo.critic_layers=K: the stage's critic is the reward model's bottom K layers
    with its value layer starting flat at the whole critic's mean value over the prompts; PPO refuses a K that is no
    whole number >= 1 and a K without a separate critic; a run starts on policy and trains the cut critic; a
    checkpoint names its critic's layer count, and a run whose critic differs is refused naming both."""
    from omegaconf import OmegaConf

    from framework.models import positions
    from framework.reward import RewardModel, critic_from_reward_model, cut_critic, export_reward_model, pad_right
    from plugins.reward_heads.heads import LastToken

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match=r"algo.critic_layers=(0 must be >= 1 \(.*bottom N layers; null: all|-1 must be >= 1|1.5 must be a whole number|True is not a finite)"):
            PPO(critic="separate", critic_layers=bad)
    with pytest.raises(ConfigError, match="algo.critic_layers=1 cuts the separate critic.*algo.critic=shared has none"):
        PPO(critic_layers=1)
    torch.manual_seed(0)
    head = LastToken()
    rm = RewardModel.from_causal_lm(CausalLMFactory(arch="gpt2", n_layer=2, n_head=2, n_embd=32, n_positions=64)
                                    .build(tokenizer), head)
    rm_dir = export_reward_model(rm, head, {"_target_": "plugins.reward_heads.heads.LastToken"}, tokenizer,
                                 tmp_path / "rm", {"format": "plain", "max_length": 64})
    whole, whole_value, _ = critic_from_reward_model(rm_dir)
    cfg = OmegaConf.create({"reward": {}})
    prompts = [tokenizer(p.text)["input_ids"] for p in PROMPTS] * 3
    ids, mask = pad_right(prompts, tokenizer.pad_token_id)
    real = mask.bool()

    def values_at_real_tokens(trunk, value):
        with torch.no_grad():
            hidden = trunk(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
            return value(hidden).squeeze(-1)[real].double()

    targets = values_at_real_tokens(whole, whole_value)
    trunk, value = RLStage.separate_critic(cfg, PPO(critic="separate", critic_path=str(rm_dir), critic_layers=1),
                                           tokenizer, prompts)
    assert len(trunk.h) == 1 and len(whole.h) == 2 and not trunk.training
    assert all(torch.equal(a, b) for a, b in zip(trunk.h[0].parameters(), whole.h[0].parameters()))
    assert torch.equal(trunk.ln_f.weight, whole.ln_f.weight) and torch.equal(trunk.wte.weight, whole.wte.weight)
    # the value layer starts flat at the whole critic's mean value over the prompts' tokens
    assert value.weight.abs().max() == 0 and targets.std() > 0.1
    assert torch.allclose(values_at_real_tokens(trunk, value), targets.mean(), atol=1e-5)
    half, half_value, _ = critic_from_reward_model(rm_dir)  # a reward model loaded in bf16 (float32 value layer)
    cut_critic(half.to(torch.bfloat16), half_value, 1, prompts, tokenizer.pad_token_id)
    assert half_value.bias.item() == pytest.approx(targets.mean().item(), abs=0.05)
    with pytest.raises(ConfigError, match="algo.critic_layers=1: the cut critic's value layer starts at the whole "
                                          "critic's mean value over token sequences .* none were given"):
        RLStage.separate_critic(cfg, PPO(critic="separate", critic_path=str(rm_dir), critic_layers=1), tokenizer)
    with pytest.raises(ConfigError, match="the reward model at .* reads at most 64 tokens, and the critic must read "
                                          "whole sequences of up to 65 .*or algo.critic=shared"):
        RLStage.separate_critic(cfg, PPO(critic="separate", critic_path=str(rm_dir)), tokenizer, prompts, 65)
    with pytest.raises(ConfigError, match=r"algo.critic_layers=3 must be in \[1, 2\]"):
        RLStage.separate_critic(cfg, PPO(critic="separate", critic_path=str(rm_dir), critic_layers=3), tokenizer,
                                prompts)
    for algorithm, has in ((PPO(critic_path=str(rm_dir)), "none"), (Reinforce(), "no critic")):
        algorithm.critic_layers = 1  # a user's algorithm that sets it without a separate critic
        with pytest.raises(ConfigError, match=f"algo.critic_layers=1 cuts a separate critic .* has {has} .*: set "
                                              "algo.critic_layers=null"):
            RLStage.separate_critic(cfg, algorithm, tokenizer)

    def with_critic(layers):
        mod = module(tokenizer, PPO(epochs=2, minibatches=2), Length(), tmp_path)
        algorithm = PPO(critic="separate", critic_path=str(rm_dir), critic_layers=layers)
        mod.policy = PolicyWithValue(mod.policy.lm, True, critic=RLStage.separate_critic(cfg, algorithm, tokenizer,
                                                                                          prompts))
        return mod

    mod = with_critic(1)
    start = [p.detach().clone() for p in mod.policy.critic.parameters()]
    metrics = fit(mod).callback_metrics
    assert metrics["first_minibatch/policy/ratio"].item() == pytest.approx(1.0, abs=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(start, mod.policy.critic.parameters()))
    held = sum(p.numel() for group in mod.optimizers().optimizer.param_groups for p in group["params"])
    assert held == count_parameters(mod.policy)
    checkpoint = {"state_dict": mod.state_dict()}
    mod.on_save_checkpoint(checkpoint)
    assert checkpoint["rl_state"]["critic"] == "a separate critic of 1 layer"
    # the record, the weights' names (a checkpoint written before the record), the record alone (DeepSpeed's
    # checkpoints keep the weights elsewhere)
    for ckpt in (checkpoint, {"state_dict": checkpoint["state_dict"]}, {"rl_state": checkpoint["rl_state"]}):
        for other, kind in ((None, "a separate critic of 2 layers"), (2, "a separate critic of 2 layers")):
            with pytest.raises(ConfigError, match=f"checkpoint's policy has a separate critic of 1 layer and this "
                                                  f"run's has {kind}: resume with the algo.critic, algo.critic_layers"):
                with_critic(other).on_load_checkpoint(ckpt)
    resumed = with_critic(1)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    assert all(torch.equal(a, b) for a, b in zip(mod.policy.critic.parameters(), resumed.policy.critic.parameters()))


def test_log_probs_from_the_sampling_pass_match_a_fresh_forward(tokenizer, tmp_path):
    """stage.logprobs_from_sampling: the behaviour log-probs are the sampling pass's (KV cache, eval mode), equal to
    a fresh forward's up to float rounding; a separate critic's values are what the joint forward gives; a PPO run
    on them starts on policy (ratio 1 to ~1e-6)."""
    def with_separate_critic(mod):
        critic = tiny_lm(tokenizer, seed=1)
        disable_dropout(critic)
        mod.policy = PolicyWithValue(mod.policy.lm, True, critic=(critic.transformer, nn.Linear(32, 1)))
        return mod

    mod = with_separate_critic(module(tokenizer, GRPO(generations=2, epochs=2), Length(), tmp_path,
                                      logprobs_from_sampling=True))
    widths = []  # the input width of every policy forward: generation's prefill and steps, or a fresh forward
    mod.policy.lm.register_forward_pre_hook(lambda m, args, kw: widths.append(kw["input_ids"].size(1)), with_kwargs=True)
    torch.manual_seed(0)
    roll = mod.rollout(PROMPTS)
    ids = torch.cat([roll.query_ids, roll.response_ids], 1)
    mask = torch.cat([roll.query_mask, roll.response_mask], 1)
    length = roll.response_ids.size(1)
    assert widths and ids.size(1) not in widths  # no forward over prompt + response: only the sampling pass
    logits, values = mod.policy(ids, mask, length)
    fresh = token_logprobs(logits, roll.response_ids, 0.7)
    real = roll.response_mask.bool()
    assert real.sum() > len(PROMPTS) and torch.allclose(roll.logprobs[real], fresh[real], atol=1e-5)
    assert torch.allclose(roll.values, values, atol=1e-6)
    assert "objective/entropy" in roll.stats

    mod = with_separate_critic(module(tokenizer, PPO(epochs=2, minibatches=2), Length(), tmp_path,
                                      logprobs_from_sampling=True))
    metrics = fit(mod).callback_metrics
    assert metrics["first_minibatch/policy/ratio"].item() == pytest.approx(1.0, abs=1e-5)
    assert metrics["first_minibatch/policy/clipfrac"].item() == 0.0


def test_an_iteration_makes_exactly_the_minibatches_asked_for(tokenizer, tmp_path):
    """6 samples in 4 minibatches are 4 updates (2, 2, 1, 1), not the 3 chunks of 2 that `chunk` would make: the
    stage counts on epochs x minibatches updates for its schedule and checkpoint steps."""
    mod = module(tokenizer, PPO(epochs=1, minibatches=4), Length(), tmp_path, updates=4)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    six = PROMPTS + PROMPTS[:2]
    trainer.fit(mod, train_dataloaders=DataLoader(ListDataset(six), batch_size=6, collate_fn=list))
    assert trainer.global_step == 4
    assert mod.lr_schedulers().get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # the cosine reached its end


def test_the_logged_kl_coefficient_is_the_one_the_iteration_used(tokenizer, tmp_path):
    kl = {"controller": "adaptive", "coef": 0.15, "target": 0.01, "horizon": 10, "estimator": "k1"}
    mod = module(tokenizer, PPO(epochs=1, minibatches=1), Length(), tmp_path, kl=kl)
    metrics = fit(mod, iterations=1).callback_metrics
    assert metrics["objective/kl_coef"].item() == pytest.approx(0.15)
    assert mod.kl_ctl.value != pytest.approx(0.15)  # the controller moved it for the next iteration
    rlhf = metrics["objective/scores"].item() - 0.15 * metrics["objective/kl"].item()
    assert metrics["objective/rlhf_reward"].item() == pytest.approx(rlhf, abs=1e-6)


class FailsMidIteration(PPO):
    def __init__(self):
        super().__init__(epochs=1, minibatches=2)
        self.calls = 0

    def loss(self, logprobs, values, mb):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("boom in the second update")
        return super().loss(logprobs, values, mb)


def test_a_checkpoint_written_in_the_middle_of_an_iteration_is_marked_and_never_continued(tokenizer, tmp_path):
    from framework.pipeline import _checkpoint_state
    from framework.stages.common import exception_checkpoint

    mod = module(tokenizer, FailsMidIteration(), Length(), tmp_path)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[exception_checkpoint(tmp_path)])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(mod, train_dataloaders=DataLoader(ListDataset(PROMPTS), batch_size=4, collate_fn=list))
    ckpt = tmp_path / "on_exception.ckpt"
    assert torch.load(ckpt, weights_only=False)["rl_state"]["mid_iteration"]
    assert written_mid_iteration(_checkpoint_state(ckpt))
    fresh = module(tokenizer, PPO(epochs=1, minibatches=2), Length(), tmp_path)
    with pytest.raises(ConfigError, match="middle of iteration 0.*last.ckpt"):
        fresh.on_load_checkpoint(torch.load(ckpt, weights_only=False))
    done = module(tokenizer, PPO(epochs=1, minibatches=2), Length(), tmp_path)
    fit(done, iterations=1)
    state = {}
    done.on_save_checkpoint(state)
    assert state["rl_state"]["mid_iteration"] is False  # an iteration boundary: whole


def test_a_non_finite_or_malformed_evaluation_reward_stops_naming_which_one(tokenizer, tmp_path):
    from framework.stages.rl import Evaluator

    lm = tiny_lm(tokenizer)
    sampling = SamplingSettings(max_new_tokens=4)
    evaluator = Evaluator(tokenizer, "chat", PROMPTS, Length(), Broken(), sampling, 1, sample_dir=tmp_path)
    with pytest.raises(NonFiniteReward, match=r"Broken returned NaN/inf for 1 of 4 samples \(gold reward\) on the "
                                              r"evaluation prompts at iteration 3"):
        evaluator(lm, 3)
    assert '"reward": "nan"' in (tmp_path / "nonfinite_rewards_eval_gold_iter3.jsonl").read_text()
    evaluator = Evaluator(tokenizer, "chat", PROMPTS, Returns(1.0), None, sampling, 1, sample_dir=tmp_path)
    with pytest.raises(RLHFError, match="reward source Returns returned a float"):
        evaluator(lm, 0)


def test_a_policy_path_that_is_not_a_policy_is_refused_naming_policy_path(tokenizer, tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    with pytest.raises(ConfigError, match="policy.path='/no/such/dir' does not exist locally"):
        RLStage.load_policy("/no/such/dir")
    with pytest.raises(ConfigError, match="model.path='/no/such/dir' does not exist locally"):
        RLStage.load_policy("/no/such/dir", "model.path")  # where the path came from model.path
    # a path under ~ is the directory it names (a separate existence check refused it)
    monkeypatch.setenv("HOME", str(tmp_path))
    tiny_lm(tokenizer).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    assert RLStage.load_policy("~/policy")[1].config.n_layer == tiny_lm(tokenizer).config.n_layer
    rm_dir = tmp_path / "rm"
    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tokenizer),
                                             num_labels=1)).save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    with pytest.raises(ConfigError, match=r"policy.path='.*/rm' holds a GPT2ForSequenceClassification, not a causal LM"):
        RLStage.load_policy(str(rm_dir))


def test_bf16_mixed_precision_trains_with_gradient_clipping(tokenizer, tmp_path):
    """Fused AdamW handles gradient unscaling itself, and Lightning refuses to clip for it under mixed precision:
    the stage takes the foreach kernel there, and clips after the precision plugin's unscaling."""
    mod = module(tokenizer, PPO(epochs=1, minibatches=1), Length(), tmp_path)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, precision="bf16-mixed")
    trainer.fit(mod, train_dataloaders=DataLoader(ListDataset(PROMPTS), batch_size=4, collate_fn=list))
    assert mod.iteration == 1 and not trainer.optimizers[0].param_groups[0]["fused"]


@pytest.mark.parametrize("offline, message", [
    ({"batch_size": 0}, r"stage.offline.batch_size=0 must be >= 1$"),
    ({"epochs": 0}, r"stage.offline.epochs=0 must be > 0 \(passes over the pairs: e.g. 1, or 0.5\)"),
    ({"epochs": -1.0}, r"stage.offline.epochs=-1 must be > 0"),
    # these named stage.val_fraction and stage.max_length (keys stage=rl does not have), after the model was loaded
    ({"val_fraction": 1.0}, r"stage.offline.val_fraction=1 must be in \[0, 1\) \(unless the dataset has"),
    ({"val_fraction": -0.1}, r"stage.offline.val_fraction=-0.1 must be in \[0, 1\)"),
    ({"max_length": 1}, r"stage.offline.max_length=1 must be >= 2 \(tokens of prompt"),
    ({"batch_size": "many"}, r"stage.offline.batch_size='many' is not a finite number \(default 16\)"),
    ({"batch_size": True}, r"stage.offline.batch_size=True is not a finite number"),
    ({"epochs": float("nan")}, r"stage.offline.epochs=nan is not a finite number"),
    ({"batch_size": 8.5}, r"stage.offline.batch_size=8.5 must be a whole number"),
    ({"checkpoint_every_n_steps": -1}, r"stage.offline.checkpoint_every_n_steps=-1 must be >= 0"),
])
def test_offline_settings_that_cannot_train_are_refused_at_start_by_their_key(offline, message):
    with pytest.raises(ConfigError, match=message):
        RLStage(offline=offline)


def test_offline_settings_take_the_defaults_and_the_given_values():
    settings = RLStage(offline={"batch_size": 8.0, "epochs": 0.5, "val_fraction": 0}).offline
    assert (settings.batch_size, settings.epochs, settings.val_fraction) == (8, 0.5, 0.0)
    assert (settings.max_length, settings.checkpoint_every_n_steps) == (256, 200)
    assert isinstance(settings.epochs, float) and isinstance(settings.batch_size, int)


@pytest.mark.parametrize("settings, message", [
    ({"prompts": -1}, r"stage.eval.prompts=-1 must be >= 0 \(0: no evaluation\)"),
    # 0 used to mean every iteration (it was raised to 1)
    ({"every_n_iterations": 0}, r"stage.eval.every_n_iterations=0 must be >= 1 \(to turn the evaluation off: "
                                r"stage.eval.prompts=0\)"),
    ({"prompts": 2.5}, r"stage.eval.prompts=2.5 must be a whole number \(default 64\)"),
    ({"every_n_iterations": None}, r"stage.eval.every_n_iterations=None is not a finite number \(default 10\)"),
])
def test_eval_settings_that_make_no_sense_are_refused_at_start_by_their_key(settings, message):
    with pytest.raises(ConfigError, match=message):
        RLStage(eval=settings)


def test_the_settings_defaults_are_the_stage_configs():
    """conf/stage/rl.yaml's `offline:` and `eval:` blocks and the defaults of OfflineSettings and EvalSettings say the
    same (a run without the yaml, e.g. RLStage() in code, trains as the CLI does)."""
    from dataclasses import asdict

    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from framework.stages.preference import OfflineSettings
    from framework.stages.rl import EvalSettings

    with initialize_config_module(config_module="rlhf_conf", version_base="1.3"):
        stage = OmegaConf.to_container(compose(config_name="config", overrides=["stage=rl"]).stage)
    for cls, section in ((OfflineSettings, stage["offline"]), (EvalSettings, stage["eval"])):
        assert cls.from_config(section) == cls() and set(section) == set(asdict(cls())), cls
    assert RLStage().eval == EvalSettings() and RLStage(eval={"prompts": 0}).eval.prompts == 0


@pytest.mark.parametrize("section, key", [("eval", "every_n_iteration"), ("offline", "epoch")])
def test_a_misspelt_eval_or_offline_key_is_refused(section, key):
    with pytest.raises(ConfigError, match=f"unknown key stage.{section}.{key} \\(did you mean"):
        RLStage(**{section: {key: 1}})


def test_the_gradient_reaching_the_optimizer_is_clipped(tokenizer, tmp_path):
    """Clipping happens in on_before_optimizer_step, inside the optimizer step's closure (after a precision plugin's
    unscaling): the norm there, right before the update, is at most stage.gradient_clip."""
    mod = module(tokenizer, PPO(epochs=2, minibatches=2), Length(), tmp_path)
    mod.gradient_clip = 1e-3
    norms = []
    clip = type(mod).on_before_optimizer_step

    def on_before_optimizer_step(self, optimizer):
        clip(self, optimizer)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    mod.on_before_optimizer_step = on_before_optimizer_step.__get__(mod)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(mod, train_dataloaders=DataLoader(ListDataset(PROMPTS), batch_size=4, collate_fn=list))
    assert len(norms) == 4 and max(norms) <= 1e-3 * (1 + 1e-4)


def test_stop_mask_keeps_the_stop_token_and_nothing_after_it():
    mask, ended = stop_mask(torch.tensor([[5, 3, 7, 3], [5, 6, 7, 8], [3, 1, 1, 1]]), 3)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]] and ended.tolist() == [True, False, True]


def rollout_with_early_stops(mod, monkeypatch):
    """A rollout of PROMPTS with the sampler nudged towards the stop token (+4 on its logit): the tiny policy rarely
    stops within 8 tokens by itself."""
    from framework.rollout import InverseCDFSampler

    sample = InverseCDFSampler.__call__

    def likely_stop(self, input_ids, scores):
        scores = scores.clone()
        scores[:, mod.stop_id] += 4.0
        return sample(self, input_ids, scores)

    monkeypatch.setattr(InverseCDFSampler, "__call__", likely_stop)
    torch.manual_seed(1)
    return mod.rollout(PROMPTS)


def test_a_rollout_with_early_stops_masks_after_the_stop_token(tokenizer, tmp_path, monkeypatch):
    """The tiny policy rarely stops within 8 tokens by itself: the sampler is nudged towards the stop token, so that
    responses of different lengths (the early-stop branch) are in one rollout."""
    mod = module(tokenizer, GRPO(generations=2), Length(), tmp_path)
    roll = rollout_with_early_stops(mod, monkeypatch)
    lengths = roll.response_mask.sum(-1)
    assert roll.ended.any() and (lengths < roll.response_ids.size(1)).any()
    for ids, mask, ended in zip(roll.response_ids, roll.response_mask, roll.ended):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        if ended:
            assert ids[n - 1] == mod.stop_id and (ids[n:] == tokenizer.pad_token_id).all()


def test_the_single_update_path_takes_log_probs_at_the_sampling_temperature(tokenizer, tmp_path):
    """GRPO at 1 epoch x 1 minibatch reuses the rollout's log-probs; with the policy equal to the reference, the
    KL is 0 only if both are taken at the same temperature (0.7 here)."""
    mod = module(tokenizer, GRPO(generations=2), Length(), tmp_path)
    metrics = fit(mod, iterations=1).callback_metrics
    assert metrics["objective/kl"].item() == pytest.approx(0.0, abs=1e-5)


def test_the_adaptive_controller_gets_the_summed_kl_and_the_episodes(tokenizer, tmp_path):
    kl = {"controller": "adaptive", "coef": 0.15, "target": 1.0, "horizon": 10, "estimator": "k1"}
    mod = module(tokenizer, GRPO(generations=2), Length(), tmp_path, kl=kl)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in mod.reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seen, update = [], mod.kl_ctl.update
    mod.kl_ctl.update = lambda kl, n: (seen.append((kl, n)), update(kl, n))
    metrics = fit(mod, iterations=1).callback_metrics
    assert metrics["objective/kl"].item() != 0.0
    assert seen == [(pytest.approx(metrics["objective/kl"].item(), rel=1e-5), 8)]  # 4 prompts x 2 samples


def test_the_algorithms_state_is_restored_from_the_checkpoint(tokenizer, tmp_path):
    mod = module(tokenizer, Reinforce(), Length(), tmp_path)
    mod.algorithm.baseline = 1.25
    checkpoint = {}
    mod.on_save_checkpoint(checkpoint)
    resumed = module(tokenizer, Reinforce(), Length(), tmp_path)
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.algorithm.baseline == 1.25
