"""Reward models: a transformers trunk + a reward head plugin, their normalisation, export and loading.

Two artifact layouts, both with the tokenizer and a `rlhf_reward` entry in config.json (gain, bias, format,
max_length, head):
- a head with `sequence_classification=True` (the linear last-token head) exports as a Hugging Face
  `...ForSequenceClassification` directory with num_labels=1, which plain transformers (and TRL, OpenRLHF, vLLM)
  load and score with; its logit is the *raw* reward, the normalised one is gain * raw + bias;
- any other head exports the trunk (`AutoModel` layout) plus `reward_head.safetensors`, and the head's `_target_`
  and arguments in `rlhf_reward.head`; `load_reward_model` rebuilds it.
"""

from __future__ import annotations

import json
import math
import numbers
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from framework.distributed import failing_together, per_process, raised_everywhere, rank, world_size
from framework.errors import ConfigError, RLHFError
from framework.interfaces import RewardFunction, RewardHead, Task
from framework.models import (bottom_layers, fused_activations, keep_bottom_layers, no_cache, positions,
                              readable_saved_dir)
from framework.records import Demonstration, Prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

HEAD_WEIGHTS = "reward_head.safetensors"
CONFIG_KEY = "rlhf_reward"


class TaskGold(RewardFunction):
    """A task's own gold scorer as a reward function (the gold of RL evaluations and of `reward=gold`)."""

    def __init__(self, task: Task):
        if task is None:
            raise ConfigError("the task gold needs a task: pick one with task=<name>")
        self.task = task
        self.name = f"{task.name}_gold"

    def score(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        return self.task.golds(prompts, completions)


class RewardModel(nn.Module):
    """trunk(input_ids, attention_mask) -> hidden states -> head -> raw rewards [batch, members].

    gain/bias (buffers, saved in checkpoints) normalise the member mean: reward = gain * mean + bias.
    """

    def __init__(self, trunk: "PreTrainedModel", head: nn.Module, members: int = 1):
        super().__init__()
        self.trunk, self.head, self.members = trunk, head, members
        self.register_buffer("gain", torch.tensor(1.0))
        self.register_buffer("bias", torch.tensor(0.0))

    @classmethod
    def from_causal_lm(cls, lm: "PreTrainedModel", head: RewardHead) -> "RewardModel":
        """The LM's transformer without its LM head, and a fresh reward head on its hidden size."""
        trunk = lm.base_model
        if trunk is lm:
            raise ConfigError(f"{type(lm).__name__} has no separate base model to put a reward head on")
        return cls(trunk, head.build(int(lm.config.hidden_size)), int(head.members))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.trunk(input_ids=input_ids, attention_mask=attention_mask, **no_cache(self.trunk))
        return self.head(out.last_hidden_state, attention_mask)

    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised reward per sequence [batch]."""
        return self.gain * self(input_ids, attention_mask).float().mean(-1) + self.bias

    def set_normalization(self, raw_rewards: torch.Tensor, target_mean: float = 0.0, target_std: float = 1.0) -> dict:
        """gain, bias such that gain * raw + bias has the target mean and std on `raw_rewards` (member means of
        policy samples): RLHF_REFERENCE 1.2 item 3."""
        raw = raw_rewards.float()
        mean, std = raw.mean(), raw.std().clamp(min=1e-6)
        gain = target_std / std
        self.gain.fill_(float(gain))
        self.bias.fill_(float(target_mean - gain * mean))
        return {"raw_mean": float(mean), "raw_std": float(std), "gain": float(self.gain), "bias": float(self.bias)}


class SequenceClassifierReward(nn.Module):
    """A `...ForSequenceClassification` model (num_labels=1) behind the RewardModel interface."""

    def __init__(self, model: "PreTrainedModel", gain: float = 1.0, bias: float = 0.0):
        super().__init__()
        self.model, self.members = model, 1
        self.register_buffer("gain", torch.tensor(float(gain)))
        self.register_buffer("bias", torch.tensor(float(bias)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **no_cache(self.model)).logits

    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.gain * self(input_ids, attention_mask).float().mean(-1) + self.bias


def export_reward_model(rm: RewardModel, head: RewardHead, head_spec: Mapping[str, Any], tokenizer,
                        out_dir: Path, extra: Mapping[str, Any]) -> Path:
    """Write the reward model directory (layouts in the module docstring)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"gain": float(rm.gain), "bias": float(rm.bias), "members": rm.members, "head": dict(head_spec), **extra}
    if head.sequence_classification:
        from transformers import AutoModelForSequenceClassification

        config = rm.trunk.config.__class__.from_dict(rm.trunk.config.to_dict())
        config.num_labels = 1
        config.pad_token_id = tokenizer.pad_token_id
        config.architectures = None
        model = AutoModelForSequenceClassification.from_config(config)
        model.base_model.load_state_dict(rm.trunk.state_dict())
        score = getattr(model, "score", None)
        if not isinstance(score, nn.Linear) or score.bias is not None or score.weight.shape != rm.head.score.weight.shape:
            raise ConfigError(f"{type(model).__name__} has no bias-free `score` layer matching the head; "
                              "use another reward_head (exported in rlhf-lab's own layout)")
        with torch.no_grad():
            score.weight.copy_(rm.head.score.weight)
        setattr(model.config, CONFIG_KEY, info)
        model.save_pretrained(str(out_dir))
    else:
        setattr(rm.trunk.config, CONFIG_KEY, info)
        rm.trunk.save_pretrained(str(out_dir))
        delattr(rm.trunk.config, CONFIG_KEY)
        save_file({k: v.detach().contiguous().cpu() for k, v in rm.head.state_dict().items()}, str(out_dir / HEAD_WEIGHTS))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def reward_info(path: str | Path, key: str = "reward.path") -> dict:
    """The `rlhf_reward` entry of a reward-model dir's config.json ({} for a plain transformers classifier)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{path}: not a reward model directory (no config.json)")
    with readable_saved_dir(key, path, "reward model's config.json"):
        return dict(json.loads(config_file.read_text()).get(CONFIG_KEY) or {})


def load_reward_model(path: str | Path, key: str = "reward.path") -> tuple[nn.Module, "PreTrainedTokenizerBase", dict]:
    """(model with `.reward(input_ids, attention_mask)`, tokenizer, rlhf_reward info) from a reward-model dir: ours
    in either layout, or any `...ForSequenceClassification` dir with num_labels=1 (then gain 1, bias 0). key: the
    setting that gave the path, named when a file in it cannot be read."""
    path = Path(path).expanduser()
    info = reward_info(path, key)
    with readable_saved_dir(key, path, "reward model"):
        return _load_reward_model(path, info)


def _load_reward_model(path: Path, info: dict) -> tuple[nn.Module, "PreTrainedTokenizerBase", dict]:
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    from framework.instantiate import instantiate_plugin
    from framework.tokenization import load_tokenizer

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    tokenizer = load_tokenizer(path)
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        if int(getattr(config, "num_labels", 1)) != 1:
            raise ConfigError(f"{path}: a classifier with num_labels={config.num_labels}; a reward model has 1")
        model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True)
        rm: nn.Module = SequenceClassifierReward(model, info.get("gain", 1.0), info.get("bias", 0.0))
    elif (path / HEAD_WEIGHTS).is_file() and info.get("head"):
        from omegaconf import OmegaConf
        from safetensors.torch import load_file

        head = instantiate_plugin(OmegaConf.create(info["head"]), "reward_head", RewardHead)
        trunk = AutoModel.from_pretrained(str(path), local_files_only=True)
        rm = RewardModel(trunk, head.build(int(config.hidden_size)), int(head.members))
        rm.head.load_state_dict(load_file(str(path / HEAD_WEIGHTS)))
        rm.gain.fill_(float(info.get("gain", 1.0)))
        rm.bias.fill_(float(info.get("bias", 0.0)))
    else:
        raise ConfigError(f"{path}: not a reward model (architectures {architectures or 'unknown'}; neither a "
                          f"...ForSequenceClassification dir nor a trunk with {HEAD_WEIGHTS})")
    fused_activations(rm).eval()
    return rm, tokenizer, info


def critic_from_reward_model(path: str | Path, key: str = "algo.critic_path"
                             ) -> tuple[nn.Module, nn.Linear, "PreTrainedTokenizerBase"]:
    """A separate PPO critic initialised from a reward model (OpenRLHF's default): (the RM's transformer, a per-token
    value layer = the RM's scoring layer with its normalisation folded in, the RM's tokenizer). The value at every
    token is then the normalised reward the RM would give the sequence cut there. `cut_critic` keeps only its
    bottom layers."""
    rm, tokenizer, _ = load_reward_model(path, key)
    if isinstance(rm, SequenceClassifierReward):
        model = rm.model
        trunk = model.base_model
        linears = [m for name, m in model.named_children()
                   if name != model.base_model_prefix and isinstance(m, nn.Linear)]
    else:
        trunk = rm.trunk
        linears = [m for m in rm.head.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise ConfigError(f"{path}: the reward head is not one linear layer ({len(linears)} found), so it cannot "
                          "become a per-token value layer; use algo.critic=shared or a last_token/mean_pool RM")
    score = linears[0]
    value = nn.Linear(score.in_features, 1)
    with torch.no_grad():
        value.weight.copy_(rm.gain * score.weight.float().mean(0, keepdim=True))
        head_bias = float(score.bias.float().mean()) if score.bias is not None else 0.0
        value.bias.fill_(float(rm.gain) * head_bias + float(rm.bias))
    trunk.train(False)
    return trunk, value, tokenizer


@torch.no_grad()
def cut_critic(trunk: nn.Module, value: nn.Linear, layers: int, sequences: Sequence[Sequence[int]], pad_id: int,
               key: str = "algo.critic_layers", batch_size: int = 64) -> dict[str, float]:
    """Cut a critic of `critic_from_reward_model` to its transformer's bottom `layers` layers, in place
    (`framework.models.keep_bottom_layers`), and restart its value layer at the whole critic's mean value.

    The reward model's scoring layer was trained on its top layer's features; read off a lower layer, it gives
    values that vary from token to token and mean nothing (on the peer's PPO workload cut to one layer, docs/
    benchmarks.md: a mean of -2.57 and a spread of 0.155 over the initial policy's responses, where the whole critic
    gave -5.06 and 0.014). Noise in the values is noise in every advantage. So the value layer's weights start at
    zero, and its bias at the whole critic's mean value over the real tokens of `sequences` (token ids: the stage's
    prompts): a start at the whole critic's level, flat, which the value loss shapes from there. (A ridge refit of
    the weights on the prompts' tokens was tried: it kept a spread of 0.065 on responses, off on tokens the prompts
    never hold.) Returns that mean, the whole critic's standard deviation over those tokens, and their number."""
    layers = bottom_layers(trunk, layers, key)  # before the forward passes, which a bad value would waste
    sequences = [s for s in sequences if len(s)]
    if not sequences:
        raise ConfigError(f"{key}={layers}: the cut critic's value layer starts at the whole critic's mean value "
                          "over token sequences (the stage's prompts), and none were given (or all were empty)")
    was_training = trunk.training
    trunk.eval()
    total = count = squares = 0.0
    device = next(trunk.parameters()).device
    for i in range(0, len(sequences), batch_size):
        ids, mask = (t.to(device) for t in pad_right(sequences[i:i + batch_size], pad_id))
        hidden = trunk(input_ids=ids, attention_mask=mask, position_ids=positions(mask), **no_cache(trunk))
        values = value(hidden.last_hidden_state[mask.bool()].to(value.weight.dtype)).squeeze(-1).double()
        total, squares, count = total + float(values.sum()), squares + float(values.pow(2).sum()), count + values.numel()
    keep_bottom_layers(trunk, layers, key)
    trunk.train(was_training)
    mean = total / count
    value.weight.zero_()
    value.bias.fill_(mean)
    return {"mean": mean, "std": math.sqrt(max(squares / count - mean**2, 0.0)), "tokens": int(count)}


def encode_scored(tokenizer, prompt: str, response: str, fmt: str, max_length: int,
                  cut_response: bool = False) -> list[int] | None:
    """prompt + response tokens as the reward model reads them (the SFT formatting: chat template or plain + EOS);
    too long: cut from the left, the prompt first. A response that does not fit with at least one prompt token gives
    None (reward-model training drops it), or with cut_response=True (scoring) the last max_length tokens: the score
    is read at the last token, so the end of the sequence is what must stay."""
    return _encode_scored(tokenizer, prompt, response, fmt, max_length, cut_response)[0]


def _encode_scored(tokenizer, prompt: str, response: str, fmt: str, max_length: int,
                   cut_response: bool) -> tuple[list[int] | None, str]:
    """(ids or None, status of `encode_demonstration`: "ok" | "truncated" | "dropped" | "cut")."""
    from framework.imitation import encode_demonstration

    example, status = encode_demonstration(tokenizer, Demonstration(prompt=prompt, response=response), fmt,
                                           max_length, cut_response=cut_response)
    return (None if example is None else list(example.input_ids)), status


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@torch.no_grad()
def score_texts(rm: nn.Module, tokenizer, prompts: Sequence[str], responses: Sequence[str], fmt: str,
                max_length: int, batch_size: int = 64, raw: bool = False,
                counts: dict[str, int] | None = None) -> torch.Tensor:
    """Rewards of (prompt, response) pairs: normalised (default) or the raw member mean. Too long for max_length: cut
    from the left, the prompt first, then the start of the response (`encode_scored(..., cut_response=True)`), so
    every pair gets a score, read at its last token. `counts`, when given, gains the number of pairs per encoding
    status: "ok", "truncated" (prompt cut), "cut" (scored on the last max_length tokens only)."""
    device = next(rm.parameters()).device
    encoded = []
    for p, r in zip(prompts, responses):
        ids, status = _encode_scored(tokenizer, p, r, fmt, max_length, cut_response=True)
        encoded.append(ids)
        if counts is not None:
            counts[status] = counts.get(status, 0) + 1
    out = torch.full((len(encoded),), float("nan"))
    keep = [i for i, e in enumerate(encoded) if e]  # an empty encoding (max_length 0) cannot be read
    was_training = rm.training
    rm.eval()  # no dropout when scoring
    try:
        for start in range(0, len(keep), batch_size):
            idx = keep[start : start + batch_size]
            ids, mask = pad_right([encoded[i] for i in idx], tokenizer.pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            values = rm(ids, mask).float().mean(-1) if raw else rm.reward(ids, mask)
            out[idx] = values.float().cpu()
    finally:
        rm.train(was_training)
    return out


class NonFiniteReward(RLHFError):
    """A reward source returned NaN or inf."""


def reward_scores(source: RewardFunction, scores: Any, n: int, device=None, dtype=torch.float,
                  method: str = "score") -> torch.Tensor:
    """What a reward source's `score` returned, checked against its contract (one real number per completion, in
    order) -> a tensor [n] of `dtype` (float64 keeps Python floats exact). NaN and inf pass here: `checked_scores`
    saves those samples and stops. method="golds": the same contract for a task's `golds`, named so."""
    who = "the task" if method == "golds" else "the reward source"

    def refuse(what: str) -> RLHFError:
        return RLHFError(f"{who} {type(source).__name__} returned {what}; {method}(prompts, completions) "
                         f"must return one real number per completion, in order ({n} here)")

    if isinstance(scores, torch.Tensor):
        if scores.dim() > 1 and scores.numel() != n:
            raise refuse(f"a tensor of shape {tuple(scores.shape)}")
        scores = scores.detach().reshape(-1).tolist()
    if isinstance(scores, (str, bytes, Mapping)) or not hasattr(scores, "__len__"):
        raise refuse(f"a {type(scores).__name__} ({str(scores)[:40]})")
    if len(scores) != n:
        raise refuse(f"{len(scores)} scores")
    values = []
    for i, value in enumerate(scores):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise refuse(f"{value!r} ({type(value).__name__}) for completion {i}")
        values.append(float(value))
    return torch.tensor(values, dtype=dtype, device=device)


def checked_scores(source: RewardFunction, prompts: Sequence[Prompt], texts: Sequence[str], path: Path, when: str,
                   consequence: str, device=None, all_processes: bool = False) -> torch.Tensor:
    """`source.score(prompts, texts)` checked against the contract (`reward_scores`) -> a float tensor; NaN or inf
    raise NonFiniteReward, the offending samples saved to `path` (jsonl). when / consequence: the message's words
    for where it happened and what it means for the run.

    all_processes: every process of a data-parallel run calls this at the same point (the RL rollout). A process
    that finds non-finite scores saves its samples to `path` with `_rank<r>` before its suffix, and every process
    stops when any one found some, with the same message; one whose reward source fails stops them all too
    (`failing_together`). A process stopping alone would leave the others waiting for it."""
    spread = all_processes and world_size() > 1
    base = Path(path)

    def of_process(r: int) -> Path:
        return base.with_name(f"{base.stem}_rank{r}{base.suffix}") if spread else base

    with failing_together(f"in its reward source {when}") if spread else nullcontext():
        scores = reward_scores(source, source.score(prompts, texts), len(texts), device)
        bad = save_nonfinite_samples(of_process(rank()), prompts, texts, scores.tolist())
    if not spread:
        if bad:
            raise NonFiniteReward(f"the reward source {type(source).__name__} returned NaN/inf for {bad} of "
                                  f"{len(texts)} samples {when}; they are saved in {base}. {consequence}")
        return scores
    counts = per_process(bad)
    if any(counts):
        where = "; ".join(f"{int(c)} of {len(texts)} samples on process {r}, saved in {of_process(r)}"
                          for r, c in enumerate(counts) if c)
        err = NonFiniteReward(f"the reward source {type(source).__name__} returned NaN/inf {when}: {where}. "
                              f"{consequence}")
        err.echoed_by_rank = rank()
        raise raised_everywhere(err)
    return scores


def save_nonfinite_samples(path: Path, prompts: Sequence[Prompt | str], completions: Sequence[str],
                           rewards: Sequence[float]) -> int:
    """Write the samples whose reward is NaN or inf to `path`, one jsonl row each: {"prompt", "completion",
    "reward"} (the reward as a string: JSON has no NaN/inf), as the RL stage's `nonfinite_rewards_iter<N>.jsonl`.
    Returns how many; writes nothing when there are none."""
    bad = [i for i, v in enumerate(rewards) if not math.isfinite(float(v))]
    if not bad:
        return 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in bad:
            prompt = prompts[i].text if isinstance(prompts[i], Prompt) else str(prompts[i])
            row = {"prompt": prompt, "completion": completions[i], "reward": str(float(rewards[i]))}
            f.write(json.dumps(row) + "\n")
    return len(bad)


__all__ = ["TaskGold", "RewardModel", "SequenceClassifierReward", "export_reward_model", "load_reward_model", "reward_info",
           "score_texts", "encode_scored", "pad_right", "save_nonfinite_samples", "NonFiniteReward", "reward_scores",
           "checked_scores", "critic_from_reward_model", "cut_critic"]
