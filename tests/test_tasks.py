"""Each task's gold scorer and expert, including from wrong prefixes; the token-level task expert."""

import pytest

from framework.errors import ExpertError
from framework.records import Prompt
from plugins.experts.task import TaskExpert
from plugins.tasks.arithmetic import Addition
from plugins.tasks.reasoning_gym import ReasoningGymTask
from plugins.tasks.sort import ReverseSymbols, SortDigits


def test_sort_positional_expert_from_wrong_prefixes():
    task = SortDigits(length=5)
    p = Prompt("sort: 3 1 4 1 5 =", meta={"digits": [3, 1, 4, 1, 5]})
    assert task.expert_continuation(p, "") == " 1 1 3 4 5"
    assert task.expert_continuation(p, " 4") == " 1 3 4 5"  # position 2 onwards of the answer
    assert task.expert_continuation(p, " 1 9 1") == " 4 5"
    assert task.expert_continuation(p, " 1 1 3 4 5") == "" and task.expert_continuation(p, " 1 1 3 4 5 5") == ""
    with pytest.raises(ValueError, match="recovery"):
        SortDigits(recovery="psychic")


def test_sort_prompts_gold_and_multiset_expert():
    task = SortDigits(length=5, recovery="multiset")
    p = Prompt("sort: 3 1 4 1 5 =", meta={"digits": [3, 1, 4, 1, 5]})
    assert task.expert_continuation(p, "") == " 1 1 3 4 5"
    assert task.gold(p, " 1 1 3 4 5") == 1.0 and task.gold(p, " 1 3 4 5") == 0.0
    assert task.expert_continuation(p, " 1 1 3") == " 4 5"
    # wrong prefixes: an out-of-order digit is used up; a digit not in the input is ignored
    assert task.expert_continuation(p, " 4") == " 1 1 3 5"
    assert task.expert_continuation(p, " 1 9 1") == " 3 4 5"
    assert task.expert_continuation(p, " 1 1 3 4 5") == ""
    assert task.expert_continuation(p, " 1 1 3 4 5 5") == ""
    assert task.expert_continuation(p, " 1 ") == "1 3 4 5"  # a prefix ending in the separator
    # the prompt text alone is enough (meta is a convenience)
    assert task.expert_continuation(Prompt("sort: 2 0 =", meta={}), "") == " 0 2"
    prompts = task.prompts(20, seed=3)
    assert prompts == task.prompts(20, seed=3) and prompts != task.prompts(20, seed=4)
    assert all(task.gold(q, task.expert_continuation(q, "")) == 1.0 for q in prompts)
    tight = SortDigits(length=3, separator="", recovery="multiset")
    q = Prompt("sort: 312 =", meta={"digits": [3, 1, 2]})
    assert tight.expert_continuation(q, "") == "123" and tight.expert_continuation(q, "2") == "13"
    with pytest.raises(ExpertError, match="sort5"):
        task.expert_continuation(Prompt("sort: =", meta={}), "")


def test_reverse_gold_and_both_experts_from_wrong_prefixes():
    task = ReverseSymbols(length=5)
    p = Prompt("reverse: 3 1 4 1 5 =", meta={"digits": [3, 1, 4, 1, 5]})
    assert task.name == "reverse5" and task.expert_continuation(p, "") == " 5 1 4 1 3"
    assert task.gold(p, " 5 1 4 1 3") == 1.0 and task.gold(p, " 3 1 4 1 5") == 0.0
    assert task.expert_continuation(p, " 4") == " 1 4 1 3"  # positional: the answer from position 2 on
    multiset = ReverseSymbols(length=5, recovery="multiset")
    assert multiset.expert_continuation(p, " 4") == " 5 1 1 3"  # the 4 is used up, the rest in reversed order
    assert multiset.expert_continuation(Prompt("reverse: 2 0 7 =", meta={}), " 7 9") == " 0 2"
    prompts = task.prompts(10, seed=1)
    assert all(q.text.startswith("reverse: ") and task.gold(q, task.expert_continuation(q, "")) == 1.0
               for q in prompts)


def test_addition_gold_and_expert_from_wrong_prefixes():
    task = Addition(digits=3)
    p = Prompt("482+377=", meta={"answer": "859"})
    assert task.expert_continuation(p, "") == "859"
    assert task.expert_continuation(p, "8") == "59"
    assert task.expert_continuation(p, "9") == "59"  # wrong first digit: still the best digits for the rest
    assert task.expert_continuation(p, "8591") == ""
    assert task.gold(p, "859") == 1.0 and task.gold(p, " 859 ") == 1.0 and task.gold(p, "858") == 0.0
    assert task.answer(Prompt("12+30=")) == "42"
    with pytest.raises(ExpertError, match="addition3"):
        task.answer(Prompt("twelve plus thirty"))
    assert all(task.gold(q, task.expert_continuation(q, "")) == 1.0 for q in task.prompts(50, seed=0))


def test_reasoning_gym_adapter():
    pytest.importorskip("reasoning_gym")
    task = ReasoningGymTask("basic_arithmetic", config={"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                        "max_digits": 1, "operators": ["+"]})
    prompts = task.prompts(5, seed=1)
    for p in prompts:
        answer = task.expert_continuation(p, "")
        assert task.gold(p, answer) == 1.0
        assert task.gold(p, answer + "0") < 1.0  # reasoning-gym may give partial credit to a wrong number
        assert task.expert_continuation(p, answer) == ""
        wrong = " x" if not answer.startswith(" x") else " y"
        assert task.expert_continuation(p, wrong) == answer[2:]  # from a wrong prefix: the rest, positionally
    with pytest.raises(ExpertError, match="no reference answer"):
        task.expert_continuation(Prompt("what?"), "")


class CharTok:
    """A tokenizer stand-in: one token per character."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0)


def test_task_expert_labels_states_token_by_token():
    expert = TaskExpert()
    expert.setup(CharTok(), stop_id=0, task=SortDigits(length=3, separator=""))
    p = Prompt("sort: 312 =", meta={"digits": [3, 1, 2]})
    labels = expert.next_token_labels(p, [], [ord(c) for c in "21"])  # a wrong trajectory
    assert labels == [ord("1"), ord("2"), ord("3")]  # positional: after "" -> 1; after "2" -> 2; after "21" -> 3
    multiset = TaskExpert()
    multiset.setup(CharTok(), stop_id=0, task=SortDigits(length=3, separator="", recovery="multiset"))
    assert multiset.next_token_labels(p, [], [ord(c) for c in "21"]) == [ord("1"), ord("1"), ord("3")]
    assert expert.next_token(p, [], [ord(c) for c in "123"]) == 0
    with pytest.raises(ExpertError, match="needs a task"):
        TaskExpert().setup(CharTok(), 0, None)
    with pytest.raises(ExpertError, match=r"task sort3: .* \[state: prompt 'sort: =', response prefix '12'\]"):
        expert.next_token(Prompt("sort: =", meta={}), [], [ord("1"), ord("2")])


def test_drive_expert_steers_back_and_the_environment_observes_the_true_offset():
    from plugins.tasks.drive import DriveLane

    task = DriveLane(length=4)
    p = Prompt("road: <|>| =")
    # on its own road the expert copies the bends and stays in the centre ('4')
    assert task.expert_continuation(p, "") == "L4S4R4S4" and task.gold(p, "L4S4R4S4") == 1.0
    assert task.demonstration(p).response == "L4S4R4S4"
    # a mistake: steering straight into the left bend drifts one right ('5'); the expert steers back
    assert task.environment(p, "S") == "5" and task.environment(p, "S5") == ""
    assert task.expert_continuation(p, "S") == "5L4R4S4"
    assert task.expert_continuation(p, "S5") == "L4R4S4"
    # the offset comes from the actions, whatever a written observation claims; anything but L/R steers straight
    assert task.expert_continuation(p, "S4") == "L4R4S4" and task.environment(p, "x") == "5"
    # a learner that keeps copying the road after its mistake stays off-centre: the expert's label differs at every
    # later action, and the gold counts the steps that end in the centre
    assert task.gold(p, "S5S5R5S5") == 0.0 and task.gold(p, "S5L4R4S4") == 0.75 and task.gold(p, "L4") == 0.25
    assert task.expert_continuation(p, "L4S4R4S4") == "" and task.expert_continuation(p, "L4S4R4S4S") == ""
    # the offset is clipped at the road's edge; steering can only gain on the road where it runs straight
    far = DriveLane(length=6)
    q = Prompt("road: <<<||| =")
    assert far.expert_continuation(q, "R6R8R8") == "L7L6L5"
    assert far.expert_continuation(Prompt("road: <<<<<< ="), "R6R8R8") == "L8L8L8"
    assert [len(x.text) for x in far.prompts(3, seed=0)] == [len("road: <<<<<< =")] * 3
    with pytest.raises(ValueError, match="bend_rate"):
        DriveLane(length=4, bend_rate=2.0)


def test_environment_observations_are_forced_into_rollouts():
    """A learner that never writes a digit still gets the environment's observation after each of its actions, and
    the observed offsets are the true ones: a learner cannot write itself back to the centre."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from framework.imitation import evaluate_task, rollout
    from plugins.tasks.drive import DriveLane

    class ByteTok(CharTok):
        pad_token_id, eos_token_id = 1, 0

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_layer=1, n_head=2, n_embd=16, n_positions=64,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=1)).eval()
    with torch.no_grad():  # a learner that always says 'S' (and never a digit)
        model.lm_head.weight.zero_()
        model.lm_head.weight[ord("S")] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
    task = DriveLane(length=4)
    prompts = [Prompt("road: <|>| ="), Prompt("road: |||| =")]
    ids = [[ord(c) for c in p.text] for p in prompts]
    free = rollout(model, ByteTok(), ids, 8, stop_id=0)
    assert "".join(chr(t) for t in free[0]) == "SSSSSSSS"  # without the task: no observations
    forced = rollout(model, ByteTok(), ids, 8, stop_id=0, prompts=prompts, task=task)
    assert ["".join(chr(t) for t in r) for r in forced] == ["S5S5S4S4", "S4S4S4S4"]
    expert = TaskExpert()
    expert.setup(ByteTok(), stop_id=0, task=task)
    metrics, texts = evaluate_task(model, ByteTok(), task, prompts, "plain", 8, expert,
                                   encode=lambda t: [ord(c) for c in t])
    assert texts == ["S5S5S4S4", "S4S4S4S4"]
    # the first road: 'S' into the left bend (the expert: 'L'), then 'S' at offset 5 on the straight (the expert:
    # 'L', back to the centre); the right bend then brings the car back by itself. The second road: no mistakes
    labels = expert.next_token_labels(prompts[0], ids[0], forced[0])
    assert "".join(chr(t) for t in labels[:8]) == "L5L5S4S4"
    assert metrics["eval/mistakes_per_seq"] == pytest.approx(2 / 2)
    assert metrics["eval/gold"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["eval/exact_match"] == pytest.approx(1 / 2)

    class Learned(DriveLane):  # a gold without an exactly-right level (as a reward model's): no exact-match rate
        exact_score = None

    learned, _ = evaluate_task(model, ByteTok(), Learned(length=4), prompts, "plain", 8,
                               encode=lambda t: [ord(c) for c in t])
    assert learned["eval/gold"] == metrics["eval/gold"] and "eval/exact_match" not in learned

    class Short(DriveLane):  # a gold returning too few scores (e.g. a reward source wrapped as the task's gold)
        def golds(self, prompts, completions):
            return super().golds(prompts, completions)[:-1]

    from framework.errors import RLHFError

    # it was averaged as it came; the message names the task and its method (it said "reward source ... score")
    with pytest.raises(RLHFError, match=r"^the task Short returned 1 scores; golds\(prompts, completions\) must "
                                        r"return one real number per completion, in order \(2 here\)"):
        evaluate_task(model, ByteTok(), Short(length=4), prompts, "plain", 8, encode=lambda t: [ord(c) for c in t])
    with pytest.raises(ValueError, match="needs the prompts"):
        rollout(model, ByteTok(), ids, 8, stop_id=0, task=task)

    class Silent(DriveLane):  # an environment whose text the tokenizer cannot express
        def environment(self, prompt, prefix):
            return "\u2603" if prefix else ""

    class NoSnow(ByteTok):
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text if ord(c) < 128]}

    with pytest.raises(ExpertError, match=r"task drive4: its environment's text .* tokenises to nothing"):
        rollout(model, NoSnow(), ids, 8, stop_id=0, prompts=prompts, task=Silent(length=4))
