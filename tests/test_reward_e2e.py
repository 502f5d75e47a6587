"""Stage 3 end to end through the real CLI: comparisons sampled from an SFT policy and labelled by a synthetic human,
a K-wise jsonl file with the listwise loss and an ensemble head, and the errors a user meets first."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from conftest import QUIET, exported_dir, mlflow_runs
from framework.reward import load_reward_model, score_texts

SMALL = ["stage.max_length=128", "trainer.enable_model_summary=false", "stage.normalize.samples=64", *QUIET]


def test_reward_model_learns_the_gold_of_its_labeller(chat_model, run_cli, rlhf_home):
    """Noiseless labels from a gold the tiny trunk can read (length): well above chance on held-out pairs."""
    _, _, sft_dir, _ = chat_model
    proc = run_cli("stage=reward_model", f"model.path={sft_dir}", "labeller/gold=length", "labeller.tau=0",
                   "dataset.n=1000", "stage.epochs=6", "stage.optimizer.lr=1e-3", "trainer.val_check_interval=60", *SMALL)
    rm_dir = exported_dir(proc.stdout, "reward model")
    client, runs = mlflow_runs(rlhf_home)
    run = runs[0]
    metrics = run.data.metrics
    assert metrics["val/gold_accuracy"] > 0.65, metrics  # measured 0.74-0.83 over training; chance is 0.5
    first = min(client.get_metric_history(run.info.run_id, "val/gold_accuracy"), key=lambda m: m.step).value
    assert metrics["val/gold_accuracy"] > first  # step 0 is measured before training
    for key in ("val/accuracy", "val/loss", "val/spearman_gold", "val/calibration_error", "val/reward_chosen_mean",
                "val/reward_rejected_std", "train/pairs_per_s", "normalization/gain"):
        assert key in metrics, key
    assert metrics["val/reward_chosen_mean"] > metrics["val/reward_rejected_mean"]
    assert run.data.tags["plugin.labeller"] == "plugins.labellers.synthetic.SyntheticLabeller"
    assert run.data.params["data.train_pairs"] == str(int(run.data.params["data.train_comparisons"]))

    hf = AutoModelForSequenceClassification.from_pretrained(rm_dir)  # the standard head: plain transformers
    assert hf.config.num_labels == 1 and hf.config.rlhf_reward["normalized_on"] == 64
    rm, tok, info = load_reward_model(rm_dir)
    words = "oh that sounds like so much fun and I would love to hear more about it tomorrow".split()
    replies = [" ".join(words[:k]) for k in (1, 3, 6, 10, 16)]
    scores = score_texts(rm, tok, ["hi"] * 5, replies, info["format"], info["max_length"]).tolist()
    # the longest reply scores above every shorter one (the 1- to 10-word ones are near ties at this size: their
    # order among themselves changed with the data split, so it is not asserted)
    assert scores[4] > max(scores[:4]), scores


def test_kwise_file_listwise_loss_and_ensemble_head(chat_model, run_cli, rlhf_home, tmp_path):
    _, pretrained, _, _ = chat_model
    words = ["great", "good", "fine", "bad", "awful"]
    rows = [{"prompt": f"day {i}:", "responses": [f"it was {w} {i}" for w in words[::-1]], "ranking": [4, 3, 2, 1, 0],
             "gold": [-2.0, -1.0, 0.0, 1.0, 2.0]} for i in range(120)]
    path = tmp_path / "ranked.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = run_cli("stage=reward_model", f"model.path={pretrained}", "dataset=comparisons_jsonl",
                   f"dataset.paths=[{path}]", "loss=kwise", "reward_head=ensemble", "reward_head.members=3",
                   "stage.format=plain", "stage.epochs=5", "stage.batch_size=8", "stage.optimizer.lr=1e-3",
                   "trainer.val_check_interval=10", *SMALL)
    rm_dir = exported_dir(proc.stdout, "reward model")
    assert (rm_dir / "reward_head.safetensors").is_file()
    client, runs = mlflow_runs(rlhf_home)
    metrics = runs[0].data.metrics
    assert metrics["val/accuracy"] > 0.9 and metrics["val/spearman_gold"] > 0.8, metrics
    assert "val/reward_std_members" in metrics
    assert runs[0].data.params["data.train_pairs"] == str(10 * int(runs[0].data.params["data.train_comparisons"]))
    # 5 epochs of the whole batches the loader yields (it drops a last partial batch): not one step more per epoch
    # (how many comparisons train, and whether 8 divides them, is the split's to decide)
    train = int(runs[0].data.params["data.train_comparisons"])
    assert runs[0].data.params["stage.max_steps_resolved"] == str(5 * (train // 8))
    rm, tok, info = load_reward_model(rm_dir)
    assert info["members"] == 3 and info["head"]["_target_"] == "plugins.reward_heads.heads.Ensemble"
    scores = score_texts(rm, tok, ["day 7:"] * 2, ["it was great 7", "it was awful 7"], "plain", 128)
    assert scores[0] > scores[1] and not torch.isnan(scores).any()


def test_a_trunk_can_judge_another_models_replies(chat_model, run_cli, run_cli_here, tmp_path):
    """stage.policy_path: the pretrained trunk learns from the SFT policy's replies (as a proxy larger than its
    policy would); the samples are the SFT model's own, so a run whose trunk is the SFT model finds them cached."""
    _, pretrained, sft_dir, _ = chat_model
    args = ["labeller/gold=length", "dataset.n=36", "trainer.val_check_interval=10", *SMALL]
    cache = {"RLHF_CACHE_DIR": str(tmp_path / "cache")}  # its own: another test may have drawn the same samples
    other = run_cli("stage=reward_model", f"model.path={pretrained}", f"stage.policy_path={sft_dir}", *args, env=cache)
    assert f"policy samples come from stage.policy_path={sft_dir}" in other.stdout
    assert "policy samples: 36 x 2 in" in other.stdout  # drawn here, for the first time
    exported_dir(other.stdout, "reward model")
    same = run_cli("stage=reward_model", f"model.path={sft_dir}", *args, env=cache)
    assert "policy samples: 36 x 2 from cache" in same.stdout and "policy samples come from" not in same.stdout
    missing = run_cli_here("stage=reward_model", f"model.path={pretrained}", "stage.policy_path=/nonexistent/policy",
                           *args, check=False)
    assert missing.returncode != 0 and "stage.policy_path='/nonexistent/policy'" in missing.stderr
    assert "policy samples" not in missing.stdout  # refused before any work


def test_user_errors(chat_model, run_cli_here, rlhf_home, tmp_path):
    _, pretrained, sft_dir, _ = chat_model
    bad_loss = run_cli_here("stage=reward_model", f"model.path={sft_dir}", "loss=lm_cross_entropy", check=False)
    assert bad_loss.returncode != 0 and "trains on preferences: loss=bradley_terry" in bad_loss.stderr
    no_policy = run_cli_here("stage=reward_model", check=False)
    assert no_policy.returncode != 0 and "model.path=<an SFT or pretrained model dir>" in no_policy.stderr
    pair = tmp_path / "pairs.jsonl"
    pair.write_text(json.dumps({"prompt": "a", "chosen": "same", "rejected": "same"}) + "\n")
    same = run_cli_here("stage=reward_model", f"model.path={sft_dir}", "dataset=comparisons_jsonl",
                        f"dataset.paths=[{pair}]", check=False)
    assert same.returncode != 0 and f"{pair}:1" in same.stderr
    # sized by trainer.max_steps (stage.epochs=null): Lightning's "no limit" is refused before any sampling
    unlimited = run_cli_here("stage=reward_model", f"model.path={sft_dir}", "++stage.epochs=null",
                             "trainer.max_steps=-1", check=False)
    assert unlimited.returncode == 2 and "trainer.max_steps=-1" in unlimited.stderr
    assert "set it > 0" in unlimited.stderr and "Traceback" not in unlimited.stderr


def test_reward_model_under_two_processes(chat_model, run_cli, rlhf_home, tmp_path):
    """`trainer=ddp` with 2 CPU processes: one tracked run, each process trains on its half of the comparisons
    (an epoch is half the steps), rank 0 exports."""
    _, pretrained, _, _ = chat_model
    rows = [{"prompt": f"day {i}:", "chosen": f"it was great {i}", "rejected": f"it was awful {i}"} for i in range(48)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = run_cli("stage=reward_model", f"model.path={pretrained}", "dataset=comparisons_jsonl",
                   f"dataset.paths=[{path}]", "stage.format=plain", "stage.epochs=2", "stage.batch_size=4",
                   "stage.optimizer.lr=1e-3", "trainer.val_check_interval=3", "trainer=ddp", "trainer.accelerator=cpu",
                   "trainer.devices=2", *SMALL, env={"OMP_NUM_THREADS": "1"})
    rm_dir = exported_dir(proc.stdout, "reward model")
    assert (rm_dir / "config.json").is_file() and "per process (2 processes)" in proc.stdout
    # validation scores each held-out comparison once (ValidationShare): Lightning's own sampler would repeat some
    # to even out the processes' shares, and it warns so in trainer.validate
    assert "replicates some samples" not in proc.stderr
    client, runs = mlflow_runs(rlhf_home)
    assert len(runs) == 1
    params, metrics = runs[0].data.params, runs[0].data.metrics
    train = int(params["data.train_comparisons"])
    assert params["stage.max_steps_resolved"] == str(2 * (-(-train // 2) // 4))
    # two epochs of half the comparisons each: the second starts within the run's steps (a process reading all of
    # them would spend every step in the first)
    max_steps = int(params["stage.max_steps_resolved"])
    epochs = {m.value for m in client.get_metric_history(runs[0].info.run_id, "epoch") if m.step < max_steps}
    assert epochs == {0.0, 1.0}, epochs
    for key in ("val/accuracy", "val/loss", "val/reward_chosen_mean", "train/pairs_per_s"):
        assert key in metrics, key


@pytest.mark.parametrize("stage", [["stage=reward_model", "stage.max_length=128"],
                                   ["stage=rl", "algo=dpo", "stage.offline.max_length=128"]])
def test_a_datasets_own_held_out_set_is_the_validation_set(chat_model, run_cli_here, monkeypatch, stage):
    """dataset.heldout=N: the stage validates on the dataset's own held-out comparisons, not on a share of its
    training ones (the stage's split is watched, and the run stopped there)."""
    import framework.stages.preference as preference
    import framework.stages.reward as reward

    _, _, sft_dir, _ = chat_model
    seen = []

    class Seen(Exception):
        pass

    def watched(records, val_fraction, seed, heldout=None):
        seen.append((len(records), heldout))
        raise Seen  # enough: nothing to train

    for module in (preference, reward):
        monkeypatch.setattr(module, "split_records", watched)
    try:
        proc = run_cli_here(*stage, f"model.path={sft_dir}", "dataset=policy_comparisons", "dataset.n=6",
                            "dataset.heldout=3", "labeller=synthetic", "labeller/gold=length", *QUIET, check=False)
        told = proc.stdout[-1500:] + proc.stderr[-1500:]
    except Seen:
        told = ""
    assert len(seen) == 1, told
    assert seen[0][1] is not None and 0 < len(seen[0][1]) <= 3, seen
