"""Stage 2 end to end through the real CLI: BC and DAgger on a task, chitchat SFT from a pretrained export, chat."""

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QUIET, REPO, exported_dir, mlflow_runs
from framework.data import hash_fraction


SORT = ["stage=sft", "task=sort", "task.length=4", "task.separator=", "dataset=task_demos", "dataset.n=300",
        "expert=task", "stage.format=plain", "tokenizer.vocab_size=260", "model.n_layer=2", "model.n_head=2",
        "model.n_embd=64", "model.n_positions=64", "stage.max_length=64", "trainer.max_steps=160",
        "trainer.val_check_interval=40", "stage.eval.max_new_tokens=8", "stage.eval.prompts=100",
        "stage.samples.prompts=[]", "trainer.enable_model_summary=false", *QUIET]


def metric_history(client, run, key):
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


@pytest.mark.parametrize("imitation", ["bc", "dagger"])
def test_sft_on_sort_beats_the_starting_model(run_cli, rlhf_home, imitation):
    extra = ["imitation=dagger", "imitation.rollouts_per_round=50"] if imitation == "dagger" else []
    proc = run_cli(*SORT, *extra)
    model_dir = exported_dir(proc.stdout)
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.n_layer == 2
    client, runs = mlflow_runs(rlhf_home)
    run = runs[0]
    exact = metric_history(client, run, "eval/exact_match")
    assert exact[0] < 0.05 and exact[-1] > exact[0] + 0.2, exact
    mistakes = metric_history(client, run, "eval/mistakes_per_seq")
    assert mistakes[-1] < mistakes[0], mistakes
    assert "val/token_accuracy" in run.data.metrics
    sizes = metric_history(client, run, "imitation/dataset_size")
    if imitation == "dagger":
        assert len(sizes) == 4 and sizes == sorted(sizes) and sizes[-1] > sizes[0]  # aggregation, round by round
        assert run.data.tags["plugin.imitation"] == "plugins.imitation.dagger.DAgger"
    else:
        assert len(sizes) == 1


def test_chitchat_sft_from_a_pretrained_dir(chat_model):
    home, pretrained, sft_dir, proc = chat_model
    tok = AutoTokenizer.from_pretrained(sft_dir)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(pretrained).get_vocab()  # the model's own tokenizer
    client, runs = mlflow_runs(home)
    sft_run = next(r for r in runs if r.data.tags["stage"] == "sft")
    val = metric_history(client, sft_run, "val/loss")
    assert val[-1] < val[0]
    assert sft_run.data.tags["plugin.dataset"] == "plugins.datasets.demonstrations.ChitchatDemonstrations"
    assert "samples:" in proc.stdout


def test_chat_command_keeps_the_conversation(chat_model, tmp_path):
    _, _, sft_dir, _ = chat_model
    proc = subprocess.run([sys.executable, "-m", "framework", "chat", f"model.path={sft_dir}", "--max-new-tokens", "12"],
                          cwd=REPO, input="hello there\n/reset\nhow are you?\n", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "user> hello there" and lines[1].startswith("bot> ")
    assert "(conversation reset)" in lines and lines[-2] == "user> how are you?" and lines[-1].startswith("bot> ")
    prompts = tmp_path / "p.txt"
    prompts.write_text("first\nsecond\n")
    proc = subprocess.run([sys.executable, "-m", "framework", "chat", "--model", str(sft_dir), "--prompts",
                           str(prompts), "--greedy", "--max-new-tokens", "8"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("bot> ") == 2


def test_chat_session_renders_history_and_trims_it(chat_model):
    from framework.chat import ChatSession
    from framework.models import load_causal_lm
    from framework.rollout import SamplingSettings
    from framework.tokenization import load_tokenizer

    _, _, sft_dir, _ = chat_model
    tok, model = load_tokenizer(sft_dir), load_causal_lm(sft_dir)
    session = ChatSession(model, tok, "be nice", 8, SamplingSettings(max_new_tokens=8, do_sample=False))
    first, _ = session.reply("hello")
    session.reply("again")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == first
    new = "a third message"
    alone = tok.apply_chat_template([session.messages[0], {"role": "user", "content": new}], tokenize=True,
                                    add_generation_prompt=True, return_dict=True)["input_ids"]
    session.budget = len(alone) + 3  # the new message fits, the history does not: whole exchanges go
    _, dropped = session.reply(new)
    assert dropped == 4 and [m["role"] for m in session.messages] == ["system", "user", "assistant"]
    session.budget = 5  # a message that cannot fit at all is refused and the history is kept
    with pytest.raises(Exception, match="at most 5 fit"):
        session.reply("this will never fit in five tokens")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]


def test_model_dir_without_tokenizer_is_a_clear_error(run_cli_here, tmp_path):
    AutoModelForCausalLM.from_config(
        __import__("transformers").AutoConfig.for_model("gpt2", n_layer=1, n_head=2, n_embd=32, vocab_size=300)
    ).save_pretrained(tmp_path / "bare")
    proc = run_cli_here("stage=sft", f"model.path={tmp_path / 'bare'}", "dataset.max_conversations=10", *QUIET,
                        check=False)
    assert proc.returncode == 2
    assert "has no tokenizer files" in proc.stderr and "tokenizer=pretrained" in proc.stderr


def test_chat_needs_a_model():
    proc = subprocess.run([sys.executable, "-m", "framework", "chat"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "model.path=DIR" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "framework", "chat", "model.path=/no/such/dir"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, input="")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_dagger_without_an_expert_stops_before_training(run_cli_here):
    overrides = [o for o in SORT if o != "expert=task"]
    proc = run_cli_here(*overrides, "imitation=dagger", check=False)
    assert proc.returncode == 2 and "needs a task to roll out on and an expert" in proc.stderr
    assert "imitation round" not in proc.stdout


def test_a_task_with_too_few_prompts_for_held_out_scoring(run_cli_here):
    proc = run_cli_here("stage=sft", "task=addition", "task.digits=1", "dataset=task_demos", "dataset.n=2000",
                        "expert=task", "stage.format=plain", "tokenizer.vocab_size=260", "model.n_layer=1",
                        "model.n_positions=64", "stage.max_length=32", "trainer.max_steps=4", *QUIET, check=False)
    assert proc.returncode == 2 and "every held-out prompt is also a demonstration" in proc.stderr


def test_demonstrations_that_all_fall_into_validation_are_named(run_cli_here, tmp_path):
    """One demonstration whose hash lands in the validation share used to stop with "no demonstration fits in
    stage.max_length", which sent the user after the wrong setting."""
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    # split by content and split_seed: the same side on every machine, and for every training seed (with seed=61
    # as the split's seed it would train)
    assert hash_fraction("hi\nhello", 1234) < 0.99 <= hash_fraction("hi\nhello", 61)
    proc = run_cli_here("stage=sft", "dataset=jsonl_sft", f"dataset.paths=[{data}]", "stage.val_fraction=0.99",
                        "seed=61", *QUIET, check=False)
    assert proc.returncode == 2 and "all 1 demonstrations fell into the validation split" in proc.stderr
    assert "stage.val_fraction=0 to train on all of them" in proc.stderr


def test_task_scored_without_a_validation_split_and_ddp_keeps_the_step_budget(run_cli, rlhf_home):
    """Two processes of DAgger: the step budget is each process's, and the round's 9 rollouts (shared out over the
    processes: tests/test_imitation.py checks the shares) are put back together into one round."""
    overrides = [o for o in SORT if not o.startswith(("trainer.max_steps", "trainer.val_check_interval"))]
    run_cli(*overrides, "stage.val_fraction=0", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            "imitation=dagger", "imitation.rounds=2", "imitation.rollouts_per_round=9",
            "trainer.max_steps=30", "trainer.val_check_interval=1000", env={"OMP_NUM_THREADS": "1"})
    client, runs = mlflow_runs(rlhf_home)
    metrics = runs[0].data.metrics
    assert "eval/exact_match" in metrics  # scored at the end even with no validation loop
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert max(steps) >= 25  # each rank trained the whole budget (Lightning's DistributedSampler would cut it)
    assert metrics["imitation/new_examples"] == 9 and metrics["imitation/round"] == 1
