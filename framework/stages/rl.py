"""Stage 4, RL from feedback: a policy optimised against a reward source plugin by a policy-algorithm plugin (PPO,
GRPO, RLOO, REINFORCE, ...), with a KL penalty to the frozen starting policy.

One Lightning training step is one iteration: sample responses to a batch of prompts (batched generation, KV cache,
left padding, full distribution at the sampling temperature), score them, compute log-probs of policy and
reference (and values) in one forward each, let the algorithm turn that into experience, then run the algorithm's
epochs x minibatches of updates with manual optimisation. Dropout is switched off in every model (set to p = 0, so
Lightning's `.train()` calls cannot bring it back): the first minibatch of every iteration then has ratio 1 exactly.
"""

from __future__ import annotations

import copy
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from framework.data import hash_fraction
from framework.distributed import failing_together, over_processes, raised_everywhere
from framework.errors import ConfigError
from framework.imitation import PromptEncoder, check_format, stop_token_id
from framework.instantiate import instantiate_plugin
from framework.interfaces import (
    PolicyAlgorithm,
    PreferenceAlgorithm,
    RewardFunction,
    Rollout,
    Stage,
    StageContext,
    StageResult,
    Task,
)
from framework.models import (context_length, count_parameters, disable_dropout, forward_takes, load_causal_lm,
                              no_cache, positions, value_branch)
from framework.records import Prompt
from framework.reward import TaskGold, checked_scores, critic_from_reward_model, cut_critic
from framework.rl import (AdaptiveKL, kl_controller_from, masked_mean, rollout_mean, token_logprobs,
                          token_logprobs_and_entropy)
from framework.rollout import HFGenerator, SamplingSettings
from framework.stages.common import (adamw_warmup_cosine, build_trainer, check_optimizer_keys, export_causal_lm,
                                     bounded, policy_path, read_section)
from framework.stages.preference import OfflineSettings, run_offline
from framework.tokenization import load_tokenizer


CRITIC_FIT_PROMPTS = 256  # a cut critic starts at the whole one's mean value over these prompts (algo.critic_layers)


def written_mid_iteration(checkpoint: dict) -> bool:
    """Whether an RL checkpoint (a loaded dict) was written in the middle of an iteration, after some of its updates
    (`RLModule.on_save_checkpoint` marks it): neither resume=true nor ckpt_path= continues from it."""
    return bool((checkpoint.get("rl_state") or {}).get("mid_iteration"))


def layer_words(n: int) -> str:
    return f"{n} layer{'s' if n != 1 else ''}"


def critic_kind(state: Mapping[str, Any]) -> str:
    """What an RLModule state dict holds for values, in words: a separate critic of N layers, a value branch of N
    layers, a value head on the last hidden state, or none."""
    def layers(prefix: str) -> str:
        # a layer's weights are named <prefix><the layer list>.<its index>.<...>: count the indices
        found = {next((part for part in k[len(prefix):].split(".") if part.isdigit()), None)
                 for k in state if k.startswith(prefix)} - {None}
        return layer_words(len(found))

    if any(k.startswith("policy.critic.") for k in state):
        return f"a separate critic of {layers('policy.critic.')}"
    if any(k.startswith("policy.value_branch.") for k in state):
        return f"a value branch of {layers('policy.value_branch.')}"
    return "a value head on its last hidden state" if "policy.value.weight" in state else "no value head"


class PolicyWithValue(nn.Module):
    """The policy LM and, for algorithms with a critic, a value estimate per token: by default a value head on the
    policy's last hidden state (zero-initialised, RLHF_REFERENCE 1.2 item 4); with `value_layers=N` the value head
    sits on a branch of N layers of its own, copied from the policy's top N and fed the policy's hidden state below
    them (`framework.models.value_branch`, trlX's `num_value_layers_unfrozen`); with `critic=(trunk, layer)` a
    separate transformer and its value layer (e.g. initialised from the reward model).
    forward -> (logits [B, L, V], values [B, L] or None)."""

    def __init__(self, lm: nn.Module, value_head: bool, critic: tuple[nn.Module, nn.Linear] | None = None,
                 value_layers: int = 0):
        super().__init__()
        self.lm = lm
        self.value = self.critic = self.value_branch = None
        self.value_layers = 0
        if critic is not None:
            if value_layers:
                raise ConfigError("algo.value_layers is for the value head on the policy (algo.critic=shared); a "
                                  "separate critic has its own transformer: set algo.value_layers=0")
            self.critic, self.value = critic
        elif value_head:
            if value_layers:
                self.value_branch, self.value_layers = value_branch(lm, value_layers), int(value_layers)
            self.value = nn.Linear(int(lm.config.hidden_size), 1)
            nn.init.zeros_(self.value.weight)
            nn.init.zeros_(self.value.bias)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, response_length: int | None = None):
        """With `response_length`: logits and values only at the positions that predict / value the last
        `response_length` tokens ([B, response_length, ...]), the LM head skipped over the prompt."""
        pos = positions(mask)
        shared = self.value is not None and self.critic is None
        out = causal_lm_forward(self.lm, ids, mask, pos, response_length, output_hidden_states=shared)
        if self.value is None:
            return out.logits, None
        if not shared:
            return out.logits, self.critic_values(ids, mask, pos, response_length)
        hidden = out.hidden_states[-1]
        if self.value_branch is not None:
            hidden = self.value_branch(inputs_embeds=out.hidden_states[-self.value_layers - 1], attention_mask=mask,
                                       position_ids=pos, **no_cache(self.value_branch)).last_hidden_state
        return out.logits, self.values_of(hidden, response_length)

    def critic_words(self) -> str:
        """What this policy has for values, in `critic_kind`'s words (recorded in RL checkpoints)."""
        if self.critic is not None:
            n = getattr(getattr(self.critic, "config", None), "num_hidden_layers", None)
            return "a separate critic" + ("" if n is None else f" of {layer_words(n)}")
        if self.value_branch is not None:
            return f"a value branch of {layer_words(self.value_layers)}"
        return "no value head" if self.value is None else "a value head on its last hidden state"

    def critic_values(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                      response_length: int | None) -> torch.Tensor:
        """The separate critic's values alone (it needs no policy forward)."""
        hidden = self.critic(input_ids=ids, attention_mask=mask, position_ids=pos, **no_cache(self.critic))
        return self.values_of(hidden.last_hidden_state, response_length)

    def values_of(self, hidden: torch.Tensor, response_length: int | None) -> torch.Tensor:
        """The value layer over a trunk's last hidden state [B, L, H] -> [B, L] (or [B, response_length])."""
        if response_length is not None:
            hidden = response_positions(hidden, response_length)
        return self.value(hidden).squeeze(-1)


def causal_lm_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                      response_length: int | None, **kwargs):
    """A causal LM's forward; with `response_length`, `.logits` holds only the [B, response_length, V] logits that
    predict the last `response_length` tokens of `ids`. Models whose forward takes `logits_to_keep` (transformers'
    GPT-2, Llama, ...) never project the prompt positions onto the vocabulary (the LM head is most of a small
    model's cost); others compute every position and are sliced."""
    keep = response_length is not None
    kwargs.update(no_cache(model))
    if keep and forward_takes(type(model), "logits_to_keep"):
        wanted = response_positions(torch.arange(ids.size(1), device=ids.device), response_length)
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=wanted, **kwargs)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs)
    if keep:
        out.logits = response_positions(out.logits, response_length)
    return out


def response_positions(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """The positions (dim -1 of a 1-d tensor, else dim 1) whose outputs predict / value the last `length` tokens:
    the output at position p belongs to the token at p + 1."""
    return tensor[-length - 1 : -1] if tensor.dim() == 1 else tensor[:, -length - 1 : -1]


def trim_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row (a minibatch of left-padded sequences is padded to
    the whole rollout's longest prompt). Position ids count real tokens only, so every output is unchanged; the
    response columns at the end are never touched."""
    shared = int((mask.cumsum(-1) == 0).sum(-1).min())
    return (ids[:, shared:], mask[:, shared:]) if shared else (ids, mask)


def response_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, response: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Per-token log-probs [B, T] of `response` (the tail of `ids`) under a causal LM, at the sampling temperature,
    with position ids that count real tokens only."""
    logits = causal_lm_forward(model, ids, mask, positions(mask), response.size(1)).logits
    return token_logprobs(logits, response, temperature)


def stop_mask(response: torch.Tensor, stop_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, T]: 1 up to and including the first stop token, or everywhere when there is none; ended [B])."""
    is_stop = response == stop_id
    ended = is_stop.any(-1)
    last = torch.where(ended, is_stop.float().argmax(-1).long(),
                       torch.full_like(ended, response.size(1) - 1, dtype=torch.long))
    steps = torch.arange(response.size(1), device=response.device)
    return (steps.unsqueeze(0) <= last.unsqueeze(1)).long(), ended


class PromptCursor(torch.utils.data.IterableDataset):
    """The prompt batches of iterations `start()` .. `iterations - 1`: iteration i, rank r takes prompts
    [r * per, (r + 1) * per) of a seeded hash stream over the pool. Read at the start of fit, after a checkpoint is
    restored, so a resumed run continues with exactly the prompts the uninterrupted run would have used; ranks
    (DDP) get different prompts."""

    def __init__(self, prompts: Sequence[Prompt], per_iteration: int, iterations: int, seed: int, start, rank):
        self.prompts, self.per, self.iterations, self.seed = list(prompts), per_iteration, iterations, seed
        self.start, self.rank = start, rank

    def batch(self, iteration: int, rank: int = 0) -> list[Prompt]:
        picks = range(rank * self.per, (rank + 1) * self.per)
        return [self.prompts[int(hash_fraction(f"{iteration}:{j}", self.seed) * len(self.prompts))] for j in picks]

    def __iter__(self):
        for it in range(self.start(), self.iterations):
            yield self.batch(it, self.rank())

    def __len__(self) -> int:
        # all iterations, also on resume: Lightning restores how many batches of the epoch are done and counts on
        # from there, while __iter__ starts at the restored iteration
        return self.iterations


class RLModule(pl.LightningModule):
    """One training step = one iteration of rollout + updates (manual optimisation)."""

    def __init__(self, policy: PolicyWithValue, reference: nn.Module, tokenizer, algorithm: PolicyAlgorithm,
                 reward: RewardFunction, kl: Mapping[str, Any], fmt: str, sampling: SamplingSettings,
                 optimizer: Mapping[str, Any], scheduler: Mapping[str, Any], total_updates: int,
                 no_eos_penalty: float | None, reward_clip: float | None, gradient_clip: float | None,
                 evaluator=None, sample_dir: Path | None = None, context: int | None = None, seed: int = 0,
                 logprobs_from_sampling: bool = False):
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        self._reference = [reference]  # not a submodule: never trained, never checkpointed, never .train()-ed
        self.tokenizer, self.algorithm, self.reward = tokenizer, algorithm, reward
        self.kl_cfg = dict(kl)
        self.kl_ctl = kl_controller_from(kl)
        self.fmt, self.sampling = fmt, sampling
        self.stop_id = stop_token_id(tokenizer, fmt)
        self.optimizer_cfg, self.scheduler_cfg, self.total_updates = dict(optimizer), dict(scheduler), total_updates
        self.no_eos_penalty, self.reward_clip, self.gradient_clip = no_eos_penalty, reward_clip, gradient_clip
        self.evaluator = evaluator
        self.sample_dir = sample_dir
        self.encode = PromptEncoder(tokenizer, fmt, context, sampling.max_new_tokens)
        self.seed = seed
        self.logprobs_from_sampling = logprobs_from_sampling
        # no reference forward when nothing uses it (e.g. a fixed zero KL coefficient)
        self.use_reference = algorithm.needs_reference(self.kl_ctl.value, isinstance(self.kl_ctl, AdaptiveKL))
        # one update per rollout and no critic: the update's forward also gives the rollout's log-probs
        self.single_update = (int(algorithm.epochs) == 1 and int(algorithm.minibatches) == 1
                              and not algorithm.needs_value)
        self.iteration = 0
        self.episodes = 0
        self.mid_iteration = False  # True between an iteration's first update and its end
        self.last_eval: tuple[int, dict[str, float]] | None = None  # (iteration, metrics) of the latest evaluation
        self._stop_requested, self._previous_sigint = False, None  # see on_fit_start

    @property
    def reference(self) -> nn.Module:
        return self._reference[0]

    def on_fit_start(self) -> None:
        self.reference.to(self.device)
        if hasattr(self.reward, "to"):
            self.reward.to(self.device)
        # Ctrl-C (SIGINT) stops between iterations, never inside one: an iteration updates the policy several times,
        # and a checkpoint taken halfway could not be resumed to the uninterrupted run. A second Ctrl-C stops at once.
        self._stop_requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._request_stop)

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        print(f"[rlhf] interrupt: stopping after iteration {self.iteration} (Ctrl-C again to stop now)", flush=True)

    def teardown(self, stage: str) -> None:  # after fit, also one that failed
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # a list of Prompt records: tensors are made on the device by the rollout

    # ----- rollout -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: Sequence[Prompt], policy_logprobs: bool = True) -> Rollout:
        """policy_logprobs=False: leave `logprobs` (and entropy) to the caller, who computes them in the update's
        own forward (one update per rollout: the same numbers, one forward fewer)."""
        k = int(self.algorithm.generations_per_prompt)
        prompts = [p for p in prompts for _ in range(k)]
        encoded = [self.encode(p.text) for p in prompts]
        started = time.perf_counter()
        # with logprobs_from_sampling, the behaviour log-probs come from the sampling pass's own logits (as TRL's
        # PPOTrainer takes them) when no value head needs the policy's forward anyway
        from_sampling = policy_logprobs and self.logprobs_from_sampling and (
            self.policy.value is None or self.policy.critic is not None)
        gen = HFGenerator(self.policy.lm, self.tokenizer, [self.stop_id]).generate_ids(
            encoded, self.sampling, return_logits=from_sampling)
        gen_s = time.perf_counter() - started
        response = gen.response_ids
        response_mask, ended = stop_mask(response, self.stop_id)
        response = torch.where(response_mask.bool(), response, torch.full_like(response, self.tokenizer.pad_token_id))
        ids = torch.cat([gen.prompt_ids, response], 1)
        mask = torch.cat([gen.prompt_mask, response_mask], 1)
        length = response.size(1)

        logprobs, values, stats = None, None, {}
        if from_sampling:
            logprobs, entropy = token_logprobs_and_entropy(gen.logits, response, self.sampling.temperature)
            values = (None if self.policy.critic is None
                      else self.policy.critic_values(ids, mask, positions(mask), length))
            stats["objective/entropy"] = float(masked_mean(entropy, response_mask))
        elif policy_logprobs:
            logits, values = self.policy(ids, mask, length)
            logprobs, entropy = token_logprobs_and_entropy(logits, response, self.sampling.temperature)
            stats["objective/entropy"] = float(masked_mean(entropy, response_mask))
        ref_logprobs = None
        if self.use_reference:
            ref_logprobs = response_logprobs(self.reference, ids, mask, response, self.sampling.temperature)

        texts = [self.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True).strip()
                 for r, m in zip(response, response_mask)]
        score_started = time.perf_counter()
        raw = checked_scores(self.reward, prompts, texts,
                             (self.sample_dir or Path(".")) / f"nonfinite_rewards_iter{self.iteration}.jsonl",
                             f"at iteration {self.iteration}",
                             "The policy was not updated with them; the last checkpoint is intact", ids.device,
                             all_processes=True)
        score_s = time.perf_counter() - score_started
        scores = raw.clone()
        # clip the source's score, then charge the penalty: a clipped score still pays for never stopping
        if self.reward_clip is not None:
            scores = scores.clamp(-float(self.reward_clip), float(self.reward_clip))
        if self.no_eos_penalty is not None:
            scores = torch.where(ended, scores, scores - float(self.no_eos_penalty))
        roll = Rollout(prompts=list(prompts), texts=texts, query_ids=gen.prompt_ids, query_mask=gen.prompt_mask,
                       response_ids=response, response_mask=response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs,
                       values=values, scores=scores, raw_scores=raw, ended=ended, group_size=k,
                       stats={"time/generation_s": gen_s, "time/reward_s": score_s, **stats})
        if logprobs is not None and ref_logprobs is None:  # no KL term anywhere: the reference is the policy itself
            roll.ref_logprobs = logprobs
        return roll

    # ----- one iteration -----------------------------------------------------------------------------------------
    def training_step(self, batch: list[Prompt], batch_idx: int) -> None:
        stop = self._stop_requested
        if self.trainer.world_size > 1:  # every process stops before the same iteration (a Ctrl-C reaches each alone)
            stop = self.trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:  # at an iteration boundary: the state is whole, checkpoint it (every process stops here)
            raise raised_everywhere(KeyboardInterrupt(f"interrupted after iteration {self.iteration}"))
        started = time.perf_counter()
        disable_dropout(self.policy)
        # the random stream of an iteration depends on (seed, iteration, rank) only: a resumed run samples and
        # shuffles exactly as the uninterrupted one (RLHF_REFERENCE 1.2 item 18: per-rank seeds)
        torch.manual_seed(self.seed * 1_000_003 + self.iteration * 100_003 + self.global_rank)
        single = self.single_update
        roll = self.rollout(batch, policy_logprobs=not single)
        length = roll.response_ids.size(1)
        if single:  # one update per rollout: its forward gives the rollout's log-probs too (ratio 1 by construction)
            ids = torch.cat([roll.query_ids, roll.response_ids], 1)
            mask = torch.cat([roll.query_mask, roll.response_mask], 1)
            logits, _ = self.policy(ids, mask, length)
            live_logprobs, entropy = token_logprobs_and_entropy(logits, roll.response_ids, self.sampling.temperature)
            roll.logprobs = live_logprobs.detach()
            if roll.ref_logprobs is None:
                roll.ref_logprobs = roll.logprobs
            roll.stats["objective/entropy"] = float(masked_mean(entropy, roll.response_mask))
        experience = self.algorithm.make_experience(roll, self.kl_ctl.value, self.kl_cfg.get("estimator", "k1"))
        opt = self.optimizers()
        sched = self.lr_schedulers()
        train_started = time.perf_counter()
        n = roll.response_ids.size(0)
        minibatches = max(1, min(int(self.algorithm.minibatches), n))
        stats: dict[str, list[float]] = {}
        first: dict[str, float] | None = None
        self.mid_iteration = True  # until the iteration is whole again: see on_save_checkpoint
        for epoch in range(int(self.algorithm.epochs)):
            order = torch.randperm(n, device=roll.response_ids.device)
            for chunk in torch.tensor_split(order, minibatches):  # exactly `minibatches` (chunk() may make fewer)
                mb = {k: (v[chunk] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.size(0) == n else v)
                      for k, v in experience.items()}
                if single:
                    new_logprobs, new_values = live_logprobs[chunk], None
                else:
                    ids, mask = trim_left_padding(torch.cat([roll.query_ids[chunk], roll.response_ids[chunk]], 1),
                                                  torch.cat([roll.query_mask[chunk], roll.response_mask[chunk]], 1))
                    logits, new_values = self.policy(ids, mask, length)
                    new_logprobs = token_logprobs(logits, roll.response_ids[chunk], self.sampling.temperature)
                loss, metrics = self.algorithm.loss(new_logprobs, new_values, mb)
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()  # clips in on_before_optimizer_step
                sched.step()
                values_f = {k: float(v) for k, v in metrics.items()}
                if first is None:
                    first = values_f
                for k, v in values_f.items():
                    stats.setdefault(k, []).append(v)
        train_s = time.perf_counter() - train_started

        # over the whole rollout (under DDP every process's share): the controller, and so the coefficient, stays
        # the same on every process
        seq_kl = float(rollout_mean(experience["seq_kl"]))
        episodes = n * self.trainer.world_size  # every process samples the same number
        kl_coef = self.kl_ctl.value  # the coefficient this iteration's rewards were shaped with
        self.kl_ctl.update(seq_kl, episodes)
        self.iteration += 1
        self.episodes += episodes
        self.mid_iteration = False
        total_s = time.perf_counter() - started
        lengths = roll.response_mask.sum(-1).float()
        log = {
            "objective/scores": float(roll.scores.mean()), "objective/raw_scores": float(roll.raw_scores.mean()),
            "objective/kl": seq_kl, "objective/kl_coef": kl_coef,
            "objective/non_score_reward": float(experience.get("non_score_reward", torch.tensor(0.0)).mean()),
            "objective/rlhf_reward": float(roll.scores.mean()) - kl_coef * seq_kl,
            "response/length": float(lengths.mean()), "response/eos_fraction": float(roll.ended.float().mean()),
            "time/training_s": train_s, "time/iteration_s": total_s, "lr": sched.get_last_lr()[0], **roll.stats,
        }
        log.update({k: sum(v) / len(v) for k, v in stats.items()})
        if first is not None:
            log.update({f"first_minibatch/{k}": v for k, v in first.items() if k.startswith("policy/")})
        log.update({k: float(v) for k, v in experience.items() if k.startswith(("returns/", "advantages/"))})
        log = over_processes(log)
        log.update({"episodes_per_s": episodes / log["time/iteration_s"], "episodes": float(self.episodes),
                    "iteration": float(self.iteration)})
        # logged by iteration (0-based), explicitly: Lightning's own step counter is not the iteration on resume
        # for callbacks (checkpoint monitors, early stopping, ...): written into the trainer's callback metrics
        # directly, as `self.log` would leave them; `self.log` of ~45 step values costs ~18 ms per iteration
        # (a torchmetrics object moved per key), 3-5% of a small model's iteration
        self.trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in log.items()})
        self.log("objective/scores_pb", log["objective/scores"], prog_bar=True, logger=False, batch_size=n)
        if self.trainer.is_global_zero and self.logger is not None:
            self.logger.log_metrics(log, step=self.iteration - 1)
        if self.evaluator is not None and self.evaluator.due(self.iteration):
            # on rank 0; under DDP the others wait for it here, so that an error in it (a NaN gold score) stops them
            # too rather than leaving them waiting in the next iteration
            with failing_together(f"in the evaluation at iteration {self.iteration}"):
                if self.trainer.is_global_zero:
                    self.last_eval = (self.iteration, self.evaluator(self.policy.lm, self.iteration))
                    self.logger.log_metrics(self.last_eval[1], step=self.iteration)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # an error in the middle of an iteration (Lightning's on_exception.ckpt) leaves some of its updates done:
        # such a checkpoint is marked, and neither resume=true nor ckpt_path= continues from it
        checkpoint["rl_state"] = {"kl": self.kl_ctl.state_dict(), "algorithm": self.algorithm.state_dict(),
                                  "iteration": self.iteration, "episodes": self.episodes,
                                  "last_eval": None if self.last_eval is None else list(self.last_eval),
                                  "mid_iteration": self.mid_iteration, "critic": self.policy.critic_words()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("rl_state") or {}
        if written_mid_iteration(checkpoint):
            raise ConfigError(f"this checkpoint was written by an error in the middle of iteration "
                              f"{state['iteration']}, after some of its updates: continuing from it would not be the "
                              "uninterrupted run. Resume from the run's last.ckpt (resume=true picks it) instead")
        weights = checkpoint.get("state_dict") or {}
        if state.get("critic") is not None:
            saved, ours = state["critic"], self.policy.critic_words()
        elif any(k.startswith("policy.") for k in weights):  # written before checkpoints recorded it: the weights
            saved, ours = critic_kind(weights), critic_kind(self.state_dict())  # names tell
        else:
            saved = ours = None
        if saved != ours:
            raise ConfigError(f"this checkpoint's policy has {saved} and this run's has {ours}: resume with the "
                              "algo.critic, algo.critic_layers and algo.value_layers the run was started with")
        if state:
            self.kl_ctl.load_state_dict(state["kl"])
            self.algorithm.load_state_dict(state.get("algorithm") or {})
            self.iteration, self.episodes = int(state["iteration"]), int(state["episodes"])
            last = state.get("last_eval")
            self.last_eval = None if last is None else (int(last[0]), dict(last[1]))

    def on_before_optimizer_step(self, optimizer) -> None:
        # here, not before opt.step(): under 16-mixed the precision plugin unscales the gradients just before this
        # hook, so the norm is the true one
        if self.gradient_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        # this module clips itself (stage.gradient_clip): with the trainer's precision that decides the AdamW kernel
        return adamw_warmup_cosine(self.policy, self.total_updates, self.optimizer_cfg, self.scheduler_cfg,
                                   str(self.trainer.precision), self.gradient_clip, "stage.gradient_clip")


class Evaluator:
    """Evaluation every `every` iterations on fixed held-out prompts, from samples at the training temperature: the
    mean proxy reward, the gold reward (when a gold exists), and with a reference model the KL of the policy to it
    on these samples (`eval/kl`, k1 summed over tokens, mean over prompts: the x-axis of over-optimisation
    curves); plus a table of samples."""

    def __init__(self, tokenizer, fmt: str, prompts: Sequence[Prompt], proxy: RewardFunction,
                 gold: RewardFunction | None, sampling: SamplingSettings, every: int, run=None, seed: int = 0,
                 context: int | None = None, reference: nn.Module | None = None, sample_dir: Path | None = None):
        self.tokenizer, self.fmt, self.prompts, self.proxy, self.gold = tokenizer, fmt, list(prompts), proxy, gold
        self.reference, self.sample_dir = reference, sample_dir
        self.encode = PromptEncoder(tokenizer, fmt, context, sampling.max_new_tokens)
        self.sampling, self.every, self.run, self.seed = sampling, max(1, every), run, seed
        self.stop_id = stop_token_id(tokenizer, fmt)

    def due(self, iteration: int) -> bool:
        return iteration % self.every == 0

    @torch.no_grad()
    def __call__(self, lm: nn.Module, iteration: int) -> dict[str, float]:
        state = torch.get_rng_state()
        torch.manual_seed(self.seed)
        try:
            gen = HFGenerator(lm, self.tokenizer, [self.stop_id])
            out = gen.generate_ids([self.encode(p.text) for p in self.prompts], self.sampling)
        finally:
            torch.set_rng_state(state)
        texts = [t.strip() for t in self.tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)]
        proxy = self.scores("proxy", self.proxy, texts, iteration)
        metrics = {"eval/proxy_reward": sum(proxy) / len(proxy)}
        if self.reference is not None:
            metrics["eval/kl"] = self.kl(lm, out)
        table = {"prompt": [p.text for p in self.prompts[:16]], "completion": texts[:16], "proxy": proxy[:16]}
        if self.gold is not None:
            gold = self.scores("gold", self.gold, texts, iteration)
            metrics["eval/gold_reward"] = sum(gold) / len(gold)
            table["gold"] = gold[:16]
        if self.run is not None:
            self.run.log_table(table, f"samples/iter_{iteration:05d}.json")
        return metrics

    def scores(self, role: str, source: RewardFunction, texts: list[str], iteration: int) -> list[float]:
        """A reward's scores of the evaluation samples, checked (the contract; NaN/inf stop the run, saved)."""
        return checked_scores(source, self.prompts, texts,
                              (self.sample_dir or Path(".")) / f"nonfinite_rewards_eval_{role}_iter{iteration}.jsonl",
                              f"({role} reward) on the evaluation prompts at iteration {iteration}",
                              "Only the evaluation saw them; the checkpoints are intact").tolist()

    def kl(self, lm: nn.Module, out) -> float:
        response = out.response_ids
        rmask, _ = stop_mask(response, self.stop_id)
        ids = torch.cat([out.prompt_ids, torch.where(rmask.bool(), response, self.tokenizer.pad_token_id)], 1)
        mask = torch.cat([out.prompt_mask, rmask], 1)
        width = out.prompt_ids.size(1)
        self.reference.to(ids.device)
        logp = [response_logprobs(m, ids, mask, ids[:, width:], self.sampling.temperature)
                for m in (lm, self.reference)]
        return float(((logp[0] - logp[1]) * rmask).sum(-1).mean())


@dataclass(frozen=True)
class EvalSettings:
    """`stage.eval`: the rl stage's held-out evaluation (proxy and gold reward of samples on task prompts the policy
    never trains on), at iteration 0, every `every_n_iterations` and at the end."""

    prompts: int = bounded(64, at_least=0, note="0: no evaluation")
    every_n_iterations: int = bounded(10, at_least=1, note="to turn the evaluation off: stage.eval.prompts=0")

    @classmethod
    def from_config(cls, settings: Mapping | None) -> EvalSettings:
        return read_section("stage.eval", cls, settings)


class RLStage(Stage):
    def __init__(self, name: str = "rl", format: str = "chat", iterations: int = 100, prompts_per_iteration: int = 16,
                 max_new_tokens: int = 32, temperature: float = 1.0, prompt_pool: int = 4096,
                 optimizer: Mapping | None = None, scheduler: Mapping | None = None, kl: Mapping | None = None,
                 no_eos_penalty: float | None = None, reward_clip: float | None = None,
                 gradient_clip: float | None = 1.0, checkpoint_every_n_iterations: int = 50,
                 eval: Mapping | None = None, offline: Mapping | None = None, logprobs_from_sampling: bool = False):
        check_format(format)
        if iterations < 1 or prompts_per_iteration < 1 or max_new_tokens < 1 or temperature <= 0:
            raise ConfigError("stage.iterations, stage.prompts_per_iteration and stage.max_new_tokens must be >= 1 "
                              "and stage.temperature > 0")
        self.name, self.format, self.iterations, self.prompts_per_iteration = name, format, iterations, prompts_per_iteration
        self.sampling = SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature)
        self.prompt_pool = prompt_pool
        self.optimizer = dict(optimizer or {"lr": 1e-5})
        self.scheduler = dict(scheduler or {"warmup_steps": 0, "min_lr_ratio": 0.0})
        self.kl = dict(kl or {"controller": "fixed", "coef": 0.05, "estimator": "k1"})
        kl_controller_from(self.kl)  # a wrong kl.* setting stops the run here, before any model is loaded
        check_optimizer_keys(self.optimizer, self.scheduler)
        if reward_clip is not None and reward_clip <= 0:
            raise ConfigError(f"stage.reward_clip={reward_clip}: scores are clipped to [-c, c], so c must be > 0 "
                              "(null: no clipping)")
        if no_eos_penalty is not None and no_eos_penalty < 0:
            raise ConfigError(f"stage.no_eos_penalty={no_eos_penalty}: it is subtracted from the score of a response "
                              "that never stopped, so a negative one would reward that; give a positive number or null")
        self.no_eos_penalty, self.reward_clip, self.gradient_clip = no_eos_penalty, reward_clip, gradient_clip
        self.checkpoint_every = checkpoint_every_n_iterations
        self.eval = EvalSettings.from_config(eval)
        self.offline = OfflineSettings.from_config(offline)
        self.logprobs_from_sampling = bool(logprobs_from_sampling)

    def run(self, ctx: StageContext) -> StageResult:
        cfg = ctx.cfg
        path, key = policy_path(cfg)
        if not path:
            raise ConfigError("stage=rl optimises a trained policy: give policy.path=<the SFT model dir>")
        algorithm = instantiate_plugin(cfg.algo, "algo", (PolicyAlgorithm, PreferenceAlgorithm))
        if isinstance(algorithm, PreferenceAlgorithm):  # offline (DPO, IPO): trains on comparisons, no rollouts
            return run_offline(self, ctx, algorithm, str(path), key)
        reward: RewardFunction = instantiate_plugin(cfg.reward, "reward", RewardFunction)
        if not cfg.get("task"):
            raise ConfigError("stage=rl draws its prompts from a task: add task=friendly_reply (or sort, addition, ...)")
        task: Task = instantiate_plugin(cfg.task, "task", Task)

        tokenizer, lm, reference = self.load_policy(str(path), key)
        n_ctx = context_length(lm)
        prompts = task.prompts(self.prompt_pool, int(cfg.seed))
        encoder = PromptEncoder(tokenizer, self.format, n_ctx, self.sampling.max_new_tokens)
        encoded = [encoder(p.text) for p in prompts]
        if encoder.truncated:
            print(f"[rlhf] warning: {encoder.truncated} of {len(prompts)} prompts are longer than {encoder.room} "
                  f"tokens (context {n_ctx} - stage.max_new_tokens {self.sampling.max_new_tokens}); they lose tokens "
                  "from the left")
        longest = max(map(len, encoded), default=0) + self.sampling.max_new_tokens
        policy = PolicyWithValue(lm, bool(algorithm.needs_value),
                                 self.separate_critic(cfg, algorithm, tokenizer, encoded, longest),
                                 algorithm.value_layers if algorithm.needs_value else 0)
        if policy.value_branch is not None:
            n = policy.value_layers
            print(f"[rlhf] critic: a value branch of {layer_words(n)} "
                  f"({count_parameters(policy.value_branch) / 1e6:.2f} M parameters), copied from the policy's top "
                  "layers and fed its hidden state below them")
        per_iter = int(self.prompts_per_iteration)
        updates = self.iterations * int(algorithm.epochs) * max(1, min(int(algorithm.minibatches),
                                                                       per_iter * int(algorithm.generations_per_prompt)))
        print(f"[rlhf] rl: {type(algorithm).__name__} on {task.name} prompts, reward {type(reward).__name__}; "
              f"policy {count_parameters(lm) / 1e6:.2f} M parameters; {self.iterations} iterations x {per_iter} "
              f"prompts x {algorithm.generations_per_prompt} samples; {updates} updates")
        evaluator = None
        n_eval = self.eval.prompts
        if n_eval > 0:
            held_out = task.prompts(n_eval, int(cfg.seed) + 7919)
            evaluator = Evaluator(tokenizer, self.format, held_out, reward, TaskGold(task), self.sampling,
                                  self.eval.every_n_iterations, ctx.run, int(cfg.seed), n_ctx,
                                  reference, ctx.output_dir)
        module = RLModule(policy, reference, tokenizer, algorithm, reward, self.kl, self.format, self.sampling,
                          self.optimizer, self.scheduler, updates, self.no_eos_penalty, self.reward_clip,
                          self.gradient_clip, evaluator, ctx.output_dir, n_ctx, int(cfg.seed),
                          logprobs_from_sampling=self.logprobs_from_sampling)
        cursor = PromptCursor(prompts, per_iter, self.iterations, int(cfg.seed), start=lambda: module.iteration,
                              rank=lambda: module.global_rank)
        loader = DataLoader(cursor, batch_size=None, collate_fn=_as_is)
        updates_per_iteration = updates // self.iterations
        trainer = build_trainer(ctx, callbacks=[], every_n_steps=self.checkpoint_every * updates_per_iteration,
                                lengthen="raise stage.iterations and resume again",
                                overrides={"max_steps": -1, "max_epochs": 1, "gradient_clip_val": None,
                                           "val_check_interval": None, "limit_val_batches": 0,
                                           "check_val_every_n_epoch": None, "log_every_n_steps": 1})
        # rank 0 only: under DDP, Lightning's launcher starts the other processes inside fit, running the whole
        # command again, and they come past here too
        if evaluator is not None and ctx.ckpt_path is None and trainer.is_global_zero:
            trainer.logger.log_metrics(evaluator(lm, 0), step=0)
        policy.train()  # dropout is already p = 0 everywhere; train mode only keeps Lightning's bookkeeping quiet
        trainer.fit(module, train_dataloaders=loader, ckpt_path=ctx.ckpt_path)
        final = {}
        if evaluator is not None and trainer.is_global_zero:
            if module.last_eval is not None and module.last_eval[0] == module.iteration:
                final = module.last_eval[1]  # the last iteration was evaluated already: not again (nor its samples)
            else:
                final = evaluator(lm, module.iteration)
                trainer.logger.log_metrics(final, step=module.iteration)

        artifact_dir = ctx.output_dir / "model"
        if trainer.is_global_zero:
            export_causal_lm(lm, tokenizer, artifact_dir, self.sampling.max_new_tokens)
            logged = ctx.run.log_dir(artifact_dir, "model", float(cfg.logger.get("log_model_max_mb", 200)))
            print(f"[rlhf] exported model + tokenizer to {artifact_dir}" + ("" if logged else " (path tagged)"))
            for k, v in final.items():
                print(f"[rlhf] {k} = {v:.4f}")
        return StageResult(artifact_dir=artifact_dir, metrics=final)

    @staticmethod
    def load_policy(path: str, key: str = "policy.path"):
        """(tokenizer, the policy to train, its frozen copy: the KL reference), dropout off for good in both. key:
        the setting that gave the path, named in the errors (a missing dir, one that holds no causal LM)."""
        lm = disable_dropout(load_causal_lm(path, key=key))
        tokenizer = load_tokenizer(path)
        reference = copy.deepcopy(lm).eval().requires_grad_(False)
        return tokenizer, lm, reference

    @staticmethod
    def separate_critic(cfg, algorithm: PolicyAlgorithm, tokenizer, prompts: Sequence[Sequence[int]] = (),
                        longest: int | None = None) -> tuple[nn.Module, nn.Linear] | None:
        """algo.critic=separate: the critic's transformer and value layer, initialised from a reward model. With
        algo.critic_layers, cut to its bottom layers, its value layer restarted at the whole critic's mean value over
        the first `CRITIC_FIT_PROMPTS` of `prompts` (token ids as the policy reads them: `framework.reward.cut_critic`).
        `longest`: the longest sequence the critic will read (prompt + response), refused past the RM's context."""
        kind = str(algorithm.critic)
        if kind not in ("shared", "separate"):
            raise ConfigError(f"algo.critic={kind}: use shared (a value head on the policy) or separate")
        layers = algorithm.critic_layers
        if not algorithm.needs_value or kind == "shared":
            if layers is not None:
                has, fix = ("none", ", or algo.critic=separate") if algorithm.needs_value else ("no critic", "")
                raise ConfigError(f"algo.critic_layers={layers} cuts a separate critic (the reward model's "
                                  f"transformer), and this {type(algorithm).__name__} has {has} "
                                  f"(algo.critic={kind}): set algo.critic_layers=null{fix}")
            return None
        path = algorithm.critic_path or (cfg.reward.get("path") if "path" in cfg.reward else None)
        if not path:
            raise ConfigError("algo.critic=separate initialises the critic from a reward model: give "
                              "algo.critic_path=<reward model dir>, or use reward=learned reward.path=<dir>")
        trunk, value, critic_tokenizer = critic_from_reward_model(
            path, "algo.critic_path" if algorithm.critic_path else "reward.path")
        if critic_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"algo.critic=separate: the reward model at {path} uses another tokenizer than the "
                              "policy; a critic reads the policy's tokens, so it needs the same vocabulary (use "
                              "algo.critic=shared)")
        reach = context_length(trunk)
        if longest is not None and reach is not None and longest > reach:
            raise ConfigError(f"algo.critic=separate: the reward model at {path} reads at most {reach} tokens, and "
                              f"the critic must read whole sequences of up to {longest} (the longest prompt + "
                              "stage.max_new_tokens): use a reward model with a longer context, shorter prompts or "
                              "responses, or algo.critic=shared")
        disable_dropout(trunk)
        part = ""
        if layers is not None:
            fit = cut_critic(trunk, value, layers, list(prompts[:CRITIC_FIT_PROMPTS]), int(tokenizer.pad_token_id))
            part = (f", its bottom {layer_words(layers)}; its value layer starts flat at the "
                    f"whole critic's mean value over {fit['tokens']} prompt tokens, {fit['mean']:.4g} (their "
                    f"std {fit['std']:.3g})")
        print(f"[rlhf] critic: a separate {type(trunk).__name__} ({count_parameters(trunk) / 1e6:.2f} M parameters) "
              f"initialised from the reward model {path}{part}")
        return trunk, value


def _as_is(batch):
    return batch
