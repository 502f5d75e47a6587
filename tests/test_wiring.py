"""Values and wiring that only end-to-end tests touched, pinned by unit tests (a mutation audit found each gap):
language-model validation metrics, packing and samplers, the text and tokenizer caches, compare's table and
plots, resume matching, the over-optimisation report's curves, top-p, and the RL stage's reward handling and
evaluation (proxy against gold, the samples table, the evaluation KL)."""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from framework.interfaces import IGNORE_INDEX, RewardFunction
from framework.records import Prompt
from framework.rollout import SamplingSettings
from plugins.datasets.chitchat import ChitchatCorpus
from plugins.tokenizers.bpe import ByteLevelBPETrainer
from test_pipeline_e2e import saved_run
from test_rl_stage import PROMPTS, Length, rollout_with_early_stops, tiny_lm


class Const(RewardFunction):
    def __init__(self, values):
        self.values = values

    def score(self, prompts, completions):
        return [self.values[i % len(self.values)] for i in range(len(completions))]


def rl_module(tokenizer, reward, tmp_path, **kwargs):
    from framework.stages.rl import PolicyWithValue, RLModule, disable_dropout
    from plugins.algorithms.group import GRPO

    lm, reference = tiny_lm(tokenizer), tiny_lm(tokenizer)
    for m in (lm, reference):
        disable_dropout(m)
    algorithm = GRPO(generations=2)
    return RLModule(PolicyWithValue(lm, algorithm.needs_value), reference.eval(), tokenizer, algorithm, reward,
                    {"controller": "fixed", "coef": 0.05, "estimator": "k1"}, "chat",
                    SamplingSettings(max_new_tokens=8, temperature=0.7), {"lr": 1e-3},
                    {"warmup_steps": 0, "min_lr_ratio": 0.0}, 8, no_eos_penalty=1.0, gradient_clip=1.0,
                    sample_dir=tmp_path, **{"reward_clip": None, **kwargs})


# ----- pretraining / language-model validation --------------------------------------------------------------------

def test_lm_validation_metrics_are_token_weighted_next_token_metrics(tokenizer):
    """Fails when the val loss is averaged per batch, perplexity/accuracy miss the next-token shift, or accuracy
    counts ignored positions: two batches with very different numbers of counted tokens."""
    from framework.stages.lm_module import CausalLMModule
    from plugins.losses.lm import LMCrossEntropy, shifted_token_loss

    lm = tiny_lm(tokenizer).eval()
    mod = CausalLMModule(lm, LMCrossEntropy(), {"lr": 1e-3}, {})
    mod.log = lambda *a, **k: None  # no trainer: only the metric states are read here
    g = torch.Generator().manual_seed(0)
    batches = []
    for counted in (2, 15):
        ids = torch.randint(0, len(tokenizer), (2, 16), generator=g)
        with torch.no_grad():
            greedy = lm(input_ids=ids).logits[:, :-1].argmax(-1)
        labels = ids.clone()
        labels[:, 1::2] = greedy[:, 0::2]  # some targets the model predicts: accuracy is neither 0 nor 1
        labels[:, 1 : 16 - counted] = IGNORE_INDEX
        batches.append({"input_ids": ids, "labels": labels})
    nll, count, correct = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            mod.validation_step(b, 0)
            logits = lm(input_ids=b["input_ids"]).logits
            loss, n = shifted_token_loss(logits, b["labels"])
            nll, count = nll + float(loss) * int(n), count + int(n)
            target = b["labels"][:, 1:]
            keep = target != IGNORE_INDEX
            correct += int((logits[:, :-1].argmax(-1) == target)[keep].sum())
    assert 0 < correct < count
    assert float(mod.val_loss.compute()) == pytest.approx(nll / count, rel=1e-5)
    assert float(mod.val_perplexity.compute()) == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert float(mod.val_correct.compute()) == pytest.approx(correct / count, rel=1e-6)


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_pretraining_validates_on_the_validation_blocks():
    """Fails when val_dataloader served the train split."""
    from framework.stages.pretrain import PackedTextDataModule

    dm = PackedTextDataModule(CharTokenizer(), ["a" * 40] * 4, ["z" * 40] * 2, seq_len=8, batch_size=2)
    dm.setup()
    val = torch.cat([b["input_ids"] for b in dm.val_dataloader()])
    assert torch.equal(val, dm.splits["val"].data)
    assert not (val == ord("a")).any()


def test_pretraining_trains_on_the_larger_hash_split(tmp_path):
    """Fails when train and val swapped in load_corpus."""
    from omegaconf import OmegaConf

    from framework.data import hash_split
    from framework.stages.pretrain import PretrainStage

    docs = [f"document number {i} about something" for i in range(200)]
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n")
    cfg = OmegaConf.create({"dataset": {"_target_": "plugins.datasets.text_files.TextFiles",
                                        "paths": [str(tmp_path / "c.txt")]}, "split_seed": 3})
    train, val = PretrainStage(val_fraction=0.1, batch_size=2, seq_len=8).load_corpus(cfg)
    assert (train, val) == hash_split(docs, 0.1, seed=3, key=lambda d: d)
    assert len(val) < len(train)


# ----- data ---------------------------------------------------------------------------------------------------------

def test_pack_token_stream_keeps_a_last_block_that_is_exactly_full():
    """Fails when n = (len(stream) - 1) // seq_len drops a block when the stream divides exactly."""
    from framework.data import pack_token_stream

    assert pack_token_stream([[1, 2, 3]], eos_id=0, seq_len=4) == [[1, 2, 3, 0]]
    assert pack_token_stream([[1, 2, 3], [4, 5, 6]], eos_id=0, seq_len=4) == [[1, 2, 3, 0], [4, 5, 6, 0]]


def test_length_grouped_sampler_yields_every_index_once():
    """Fails when the short last batch was dropped (items lost in every epoch when drop_last is off)."""
    from framework.data import LengthGroupedSampler

    sampler = LengthGroupedSampler([(i * 7) % 11 for i in range(23)], batch_size=4, seed=1, mega=2)
    out = list(sampler)
    assert sorted(out) == list(range(23)) and len(out) == len(sampler)


def test_text_files_max_documents_and_overlapping_globs(tmp_path):
    """Fails when max_documents off by one; or a file matched by two patterns read twice."""
    from plugins.datasets.text_files import TextFiles

    (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree\n")
    assert [d.text for d in TextFiles(paths=[str(tmp_path / "a.txt")], max_documents=2).texts()] == ["one", "two"]
    both = TextFiles(paths=[str(tmp_path / "*.txt"), str(tmp_path / "a.txt")]).texts()
    assert [d.text for d in both] == ["one", "two", "three"]


def test_bpe_cache_key_separates_documents_and_min_frequency(tmp_path):
    """Fails when corpus hash without a separator: ["ab", "c"] == ["a", "bc"]; or min_frequency not in the key."""
    from plugins.tokenizers.bpe import corpus_key

    assert corpus_key(["ab", "c"], {}) != corpus_key(["a", "bc"], {})
    corpus = [t.text for t in ChitchatCorpus(max_documents=100).texts()]
    ByteLevelBPETrainer(vocab_size=300, min_frequency=2).build(corpus, tmp_path)
    other = ByteLevelBPETrainer(vocab_size=300, min_frequency=5)
    other.build(corpus, tmp_path)
    assert other.last_trained


# ----- compare / tracking / resume ----------------------------------------------------------------------------------

def test_compare_best_and_final():
    """Fails when best ignores LOWER_IS_BETTER; or final is the first value."""
    from framework.compare import best, table

    assert best("val/loss", [3.0, 1.0, 2.0]) == 1.0 and best("objective/kl", [0.5, 0.1]) == 0.1
    assert best("eval/gold_reward", [0.2, 0.9, 0.5]) == 0.9
    run = SimpleNamespace(info=SimpleNamespace(run_id="abcdef123"),
                          data=SimpleNamespace(tags={"mlflow.runName": "r"}, params={}))
    lines = table([run], [], ["val/loss"], {("abcdef123", "val/loss"): [(0, 3.0), (1, 1.0), (2, 2.5)]})
    rows = {line[: line.index(")") + 1]: line.split()[-1] for line in lines if line.startswith("val/loss")}
    assert rows == {"val/loss (final)": "2.5", "val/loss (best)": "1"}


def test_compare_plots_gold_against_sqrt_kl(monkeypatch, tmp_path):
    """Fails when the x axis was KL, not sqrt(KL)."""
    import framework.compare as cmp

    drawn = []
    axes = [SimpleNamespace(plot=lambda xs, ys, **k: drawn.append((list(xs), list(ys))), set_xlabel=lambda *a: None,
                            set_ylabel=lambda *a: None, set_title=lambda *a: None)]
    monkeypatch.setattr(cmp, "plot_figure", lambda *a, **k: (None, None, axes))
    monkeypatch.setattr(cmp, "save_plot", lambda *a, **k: None)
    run = SimpleNamespace(info=SimpleNamespace(run_id="r1"), data=SimpleNamespace(tags={}, params={}))
    hist = {("r1", "eval/kl"): [(0, 0.0), (5, 4.0), (10, 9.0)], ("r1", "eval/gold_reward"): [(0, 0.1), (5, 0.3), (10, 0.2)]}
    cmp.plot_gold_vs_kl([run], hist, tmp_path)
    assert drawn == [([0.0, 2.0, 3.0], [0.1, 0.3, 0.2])]


def test_resume_needs_the_same_dataset_and_takes_the_newest_match(tmp_path):
    """Fails when RESUME_MUST_MATCH without "dataset" or "split_seed"; or the oldest matching checkpoint picked."""
    from omegaconf import OmegaConf

    from framework.errors import ConfigError
    from framework.pipeline import find_resume_checkpoint

    cfg = {"stage": {"name": "pretrain"}, "split_seed": 1234,
           "dataset": {"_target_": "plugins.datasets.text_files.TextFiles", "paths": ["/a.txt"]}}
    old, new = saved_run(tmp_path, "old", cfg), saved_run(tmp_path, "new", cfg)
    os.utime(old, (1e9, 1e9))
    os.utime(new, (2e9, 2e9))
    assert find_resume_checkpoint(tmp_path, OmegaConf.create(cfg), "pretrain") == new
    other = OmegaConf.create(cfg)
    other.dataset.paths = ["/b.txt"]
    with pytest.raises(ConfigError, match="other dataset settings"):
        find_resume_checkpoint(tmp_path, other, "pretrain")
    # another split_seed is another validation set: training on would use the old one's items
    resplit = OmegaConf.create({**cfg, "split_seed": 5})
    with pytest.raises(ConfigError, match=r"other split_seed settings \(split_seed 1234 there, 5 now\)"):
        find_resume_checkpoint(tmp_path, resplit, "pretrain")
    # the RL stage splits nothing with an online algorithm (its prompts), only with an offline one (DPO)
    rl = {**cfg, "stage": {"name": "rl", "_target_": "framework.stages.rl.RLStage"},
          "algo": {"_target_": "plugins.algorithms.ppo.PPO"}}
    os.utime(saved_run(tmp_path, "rl", rl), (3e9, 3e9))
    assert find_resume_checkpoint(tmp_path, OmegaConf.create({**rl, "split_seed": 5}), "rl").parent.parent.name == "rl"
    renamed = {**rl, "stage": {**rl["stage"], "name": "my_rl"}}  # the class decides, not the stage's name
    saved_run(tmp_path, "my_rl", renamed)
    assert find_resume_checkpoint(tmp_path, OmegaConf.create({**renamed, "split_seed": 5}), "my_rl").parent.parent.name \
        == "my_rl"
    dpo = {**rl, "algo": {"_target_": "plugins.algorithms.dpo.DPO"}}
    os.utime(saved_run(tmp_path, "dpo", dpo), (4e9, 4e9))
    with pytest.raises(ConfigError, match=r"dpo/checkpoints/last.ckpt\) was made with other split_seed settings"):
        find_resume_checkpoint(tmp_path, OmegaConf.create({**dpo, "split_seed": 5}), "rl")


# ----- over-optimisation report -------------------------------------------------------------------------------------

def test_overoptimization_curves_are_gains_over_the_start_against_sqrt_kl(monkeypatch):
    """Fails when d = KL instead of sqrt(KL); or gains against the last evaluation instead of the first."""
    import mlflow
    from omegaconf import OmegaConf

    import framework.tracking
    from plugins.experiments.overoptimization_report import OveroptimizationReport

    history = {"eval/kl": {0: 0.0, 1: 4.0, 2: 9.0}, "eval/gold_reward": {0: 1.0, 1: 2.0, 2: 1.5},
               "eval/proxy_reward": {0: 0.0, 1: 1.0, 2: 3.0},
               "bon/d": {1: 0.0, 2: 0.5, 4: 1.0}, "bon/gold": {1: 0.2, 2: 0.4, 4: 0.5},
               "bon/proxy": {1: 0.0, 2: 1.0, 4: 2.0}}

    class Client:
        def __init__(self, *a, **k):
            pass

        def get_metric_history(self, run_id, key):
            return [SimpleNamespace(step=s, value=v) for s, v in history[key].items()]

    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    monkeypatch.setattr(framework.tracking, "resolve_tracking_uri", lambda *a: "unused")

    class Report(OveroptimizationReport):
        def sweep_runs(self, config, stage):
            return [SimpleNamespace(info=SimpleNamespace(run_id=stage),
                                    data=SimpleNamespace(params={"seed": "0", "reward._target_": "x.Gold"}))]

    curves = Report().curves(OmegaConf.create({"logger": {}, "paths": {"root": "."}}))
    rl = curves[("rl", "Gold")]
    assert [p["d"] for p in rl] == [0.0, 2.0, 3.0]
    assert [p["gold_gain"] for p in rl] == [0.0, 1.0, 0.5] and [p["proxy_gain"] for p in rl] == [0.0, 1.0, 3.0]
    bon = curves[("bon", "Gold")]
    assert [p["d"] for p in bon] == [0.0, 0.5, 1.0] and [p["gold_gain"] for p in bon] == pytest.approx([0.0, 0.2, 0.3])


# ----- rollout ------------------------------------------------------------------------------------------------------

def test_top_p_reaches_generation(tokenizer):
    """Fails when top_p < 1 was ignored (the full distribution sampled). A tiny top_p keeps only the top token: greedy."""
    from framework.rollout import HFGenerator

    lm = tiny_lm(tokenizer)
    gen = HFGenerator(lm, tokenizer, [tokenizer.eos_token_id])
    prompts = [tokenizer("hello there")["input_ids"], tokenizer("how are you")["input_ids"]]
    torch.manual_seed(0)
    nucleus = gen.generate_ids(prompts, SamplingSettings(max_new_tokens=12, top_p=1e-6, min_new_tokens=12))
    greedy = gen.generate_ids(prompts, SamplingSettings(max_new_tokens=12, do_sample=False, min_new_tokens=12))
    assert torch.equal(nucleus.response_ids, greedy.response_ids)


# ----- RL stage: reward handling ------------------------------------------------------------------------------------

def test_reward_clip_bounds_negative_scores_too(tokenizer, tmp_path):
    """Fails when clamp(max=c) only."""
    mod = rl_module(tokenizer, Const([-5.0, 5.0, 0.1]), tmp_path, reward_clip=0.3)
    torch.manual_seed(1)
    roll = mod.rollout(PROMPTS)
    assert (roll.raw_scores < -0.3).any()
    assert torch.equal(roll.scores, roll.raw_scores.clamp(-0.3, 0.3) - 1.0 * (~roll.ended).float())


def test_non_finite_dump_holds_only_the_offending_samples(tokenizer, tmp_path):
    """Fails when every sample of the batch written to nonfinite_rewards_iter0.jsonl."""
    from framework.reward import NonFiniteReward

    mod = rl_module(tokenizer, Const([0.0, float("inf"), 0.0, 0.5]), tmp_path)
    with pytest.raises(NonFiniteReward, match="NaN/inf for 2 of 8"):
        mod.rollout(PROMPTS)
    rows = [json.loads(line) for line in (tmp_path / "nonfinite_rewards_iter0.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == ["inf", "inf"]


def test_the_reward_reads_the_response_text_without_special_tokens(tokenizer, tmp_path, monkeypatch):
    """Fails when texts decoded with skip_special_tokens=False hand the stop token's text to the reward (and, for a reward
    model with another tokenizer, into its re-tokenisation)."""
    mod = rl_module(tokenizer, Length(), tmp_path)
    roll = rollout_with_early_stops(mod, monkeypatch)
    assert roll.ended.any()
    stop_text = tokenizer.convert_ids_to_tokens(mod.stop_id)
    for text, ids, mask in zip(roll.texts, roll.response_ids, roll.response_mask):
        assert stop_text not in text
        assert text == tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True).strip()


def test_a_learned_reward_keeps_non_finite_scores_non_finite(monkeypatch):
    """Fails when NaN/inf from the reward model turned into 0.0, which would slip past the stage's NaN/inf stop."""
    import plugins.rewards.learned as learned

    monkeypatch.setattr(learned, "score_texts", lambda *a, **k: torch.tensor([1.0, float("inf"), float("nan")]))
    reward = learned.LearnedReward.__new__(learned.LearnedReward)
    reward.model = reward.tokenizer = None
    reward.format, reward.max_length, reward.batch_size, reward.path = "chat", 64, 8, "rm"
    reward.scored, reward.cut, reward._warned = 0, 0, False
    out = reward.score([Prompt("p")] * 3, ["a", "b", "c"])
    assert out[0] == 1.0 and math.isnan(out[1]) and math.isnan(out[2])


def test_a_weighted_sum_weighs_each_component():
    """Each component's scores are weighted (a direct unit test of reward=sum)."""
    from plugins.rewards.learned import WeightedSum

    total = WeightedSum({"a": {"weight": 2.0, "reward": Const([1.0])}, "b": {"weight": -0.5, "reward": Const([4.0])}})
    assert total.score([Prompt("p")] * 2, ["x", "y"]) == [0.0, 0.0]
    total = WeightedSum({"a": {"weight": 3.0, "reward": Const([1.0])}})
    assert total.score([Prompt("p")], ["x"]) == [3.0]


# ----- RL stage: evaluation -----------------------------------------------------------------------------------------

class TableRun:
    def __init__(self):
        self.tables = {}

    def log_table(self, data, artifact_file):
        self.tables[artifact_file] = data


def test_the_evaluator_reports_gold_and_proxy_apart_with_an_aligned_table(tokenizer, tmp_path):
    """Fails when eval/gold_reward = the proxy mean; or the table's gold column holds the proxy; or table prompts
    shifted against their completions. The e2e test uses reward=gold, where proxy == gold hides all three."""
    from framework.stages.rl import Evaluator

    run = TableRun()
    prompts = PROMPTS + [Prompt("and one more")]
    evaluator = Evaluator(tokenizer, "chat", prompts, Length(), Const([5.0]), SamplingSettings(max_new_tokens=4), 1,
                          run=run, sample_dir=tmp_path)
    metrics = evaluator(tiny_lm(tokenizer), 2)
    table = run.tables["samples/iter_00002.json"]
    assert metrics["eval/gold_reward"] == 5.0 and table["gold"] == [5.0] * 5
    assert table["proxy"] == pytest.approx([len(c) / 10 for c in table["completion"]])
    assert metrics["eval/proxy_reward"] == pytest.approx(sum(table["proxy"]) / 5)
    assert table["prompt"] == [p.text for p in prompts]


def test_the_evaluator_kl_counts_response_tokens_up_to_the_stop_only(tokenizer):
    """Fails when eval/kl summed the log-ratio over the padding after the stop token too."""
    from framework.rollout import Generation
    from framework.stages.rl import Evaluator, response_logprobs, stop_mask

    lm, reference = tiny_lm(tokenizer, 0).eval(), tiny_lm(tokenizer, 1).eval()  # no dropout: deterministic
    evaluator = Evaluator(tokenizer, "chat", PROMPTS[:2], Length(), None, SamplingSettings(max_new_tokens=6), 1,
                          reference=reference)
    stop = evaluator.stop_id
    prompt = torch.tensor([tokenizer("hello there")["input_ids"]] * 2)
    response = torch.tensor([[40, 41, stop, tokenizer.pad_token_id, tokenizer.pad_token_id, tokenizer.pad_token_id],
                             [42, 43, 44, 45, 46, 47]])
    out = Generation(prompt_ids=prompt, prompt_mask=torch.ones_like(prompt), response_ids=response)
    rmask, _ = stop_mask(response, stop)
    ids = torch.cat([prompt, response], 1)
    mask = torch.cat([torch.ones_like(prompt), rmask], 1)
    with torch.no_grad():
        logp = [response_logprobs(m, ids, mask, response, 1.0) for m in (lm, reference)]
        expected = float(((logp[0] - logp[1]) * rmask).sum(-1).mean())
        unmasked = float((logp[0] - logp[1]).sum(-1).mean())
        assert abs(expected - unmasked) > 1e-4
        assert evaluator.kl(lm, out) == pytest.approx(expected, abs=1e-5)


def test_the_rl_stage_evaluates_with_its_reward_as_proxy_the_task_gold_as_gold_on_held_out_prompts(
        tokenizer, tmp_path, monkeypatch):
    """Fails when proxy and gold swapped where the stage builds its Evaluator; or evaluation prompts drawn with the
    training pool's seed: the first pool prompts, which the policy trains on."""
    from omegaconf import OmegaConf

    import framework.stages.rl as rl
    from framework.interfaces import StageContext
    from framework.reward import TaskGold
    from plugins.rewards.length import Length as LengthReward
    from plugins.tasks.sort import SortDigits

    seen = {}

    class Built(Exception):
        pass

    class Capture:
        def __init__(self, tokenizer, fmt, prompts, proxy, gold, *args, **kwargs):
            seen.update(prompts=[p.text for p in prompts], proxy=proxy, gold=gold)
            raise Built

    lm = tiny_lm(tokenizer)
    monkeypatch.setattr(rl, "Evaluator", Capture)
    monkeypatch.setattr(rl.RLStage, "load_policy", staticmethod(lambda path, key="policy.path": (tokenizer, lm, lm)))
    cfg = OmegaConf.create({"policy": {"path": "/sft"}, "model": {}, "seed": 0,
                            "algo": {"_target_": "plugins.algorithms.group.GRPO"},
                            "reward": {"_target_": "plugins.rewards.length.Length"},
                            "task": {"_target_": "plugins.tasks.sort.SortDigits", "length": 4}})
    stage = rl.RLStage(prompt_pool=64, max_new_tokens=8, eval={"prompts": 8, "every_n_iterations": 1})
    with pytest.raises(Built):
        stage.run(StageContext(cfg=cfg, output_dir=tmp_path, run=None, ckpt_path=None))
    assert isinstance(seen["proxy"], LengthReward) and isinstance(seen["gold"], TaskGold)
    pool = [p.text for p in SortDigits(length=4).prompts(64, 0)]
    assert seen["prompts"] != pool[:8]


def test_length_grouping_survives_lightnings_distributed_sampler():
    """Fails when the reward model's length groups are cut for one process: Lightning deals the sampler's order out
    round-robin under DDP, so each process's batch took every other item of two unrelated groups (as much padding as
    no grouping); or when the batches are not reshuffled each epoch under DDP (Lightning's wrapper passed set_epoch
    on to the sampler only from 2.6.1: the sampler reads the trainer's epoch itself)."""
    import random
    from types import SimpleNamespace

    from pytorch_lightning.trainer.connectors.data_connector import _get_distributed_sampler
    from pytorch_lightning.trainer.states import RunningStage
    from pytorch_lightning.utilities.data import _is_dataloader_shuffled

    from framework.stages.reward import ComparisonDataModule

    rng = random.Random(0)
    groups = [SimpleNamespace(input_ids=[[0] * rng.randint(1, 200)]) for _ in range(96)]
    length = {id(g): len(g.input_ids[0]) for g in groups}

    def orders(processes: int, epoch: int) -> list[list[int]]:
        dm = ComparisonDataModule(groups, [], batch_size=4, pad_id=0, seed=3, shards=processes)
        dm.trainer = SimpleNamespace(current_epoch=epoch)
        loader = dm.train_dataloader()
        if processes == 1:
            return [list(loader.sampler)]
        # what Lightning's DDP puts in the loader's place (without passing set_epoch on, as before 2.6.1)
        return [list(_get_distributed_sampler(loader, _is_dataloader_shuffled(loader), 0, RunningStage.TRAINING,
                                              num_replicas=processes, rank=rank)) for rank in range(processes)]

    def mean_spread(processes: int) -> float:
        spreads = [max(ls) - min(ls) for order in orders(processes, 0) for start in range(0, len(order), 4)
                   for ls in [[length[id(groups[i])] for i in order[start:start + 4]]]]
        return sum(spreads) / len(spreads)

    one, two = mean_spread(1), mean_spread(2)
    assert two < 2.5 * one + 5, (one, two)  # measured: one 6.7, two 13.1 (76.4 before the fix)
    assert orders(2, 1) != orders(2, 0) and sorted(sum(orders(2, 1), [])) == list(range(96))
