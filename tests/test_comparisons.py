"""Comparison datasets: pairwise and K-wise preference rows from jsonl files and saved datasets, validated row by row."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from framework.errors import DataError
from framework.instantiate import instantiate_plugin
from framework.interfaces import ComparisonContext, ComparisonDataset
from framework.records import Ranking
from plugins.datasets.comparisons import JsonlComparisons, SavedComparisons, parse_comparison
from plugins.datasets.text_files import validated_rows

REPO = Path(__file__).resolve().parents[1]
PAIR = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
KWISE = {"prompt": "sort 3 1 2", "responses": ["1 2 3", "3 2 1", "1 3 2"], "ranking": [0, 2, 1]}
MESSAGES = [{"role": "assistant", "content": "4"}]


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def ctx():
    return ComparisonContext(sample=lambda prompts, k: [["x"] * k for _ in prompts])


def test_pairwise_rows(tmp_path):
    f = write(tmp_path / "d.jsonl", [
        PAIR,
        {"prompt": "", "chosen": "good", "rejected": "bad", "margin": 2, "gold_chosen": 1.0, "gold_rejected": 0},
        {**PAIR, "id": 7, "score_chosen": 9.0, "source": "trl", "margin": None},  # extra columns are ignored
    ])
    rows = list(JsonlComparisons(f).comparisons(ctx()))
    assert rows[0] == Ranking("2+2?", ("4", "5"), (0, 1), source=f"{f}:1")
    assert rows[0].pairs() == [(0, 1)] and rows[0].ranked == ["4", "5"] and rows[0].margin is None
    assert rows[1].prompt == "" and rows[1].margin == 2.0 and rows[1].gold == (1.0, 0.0)
    assert rows[2].source.endswith("d.jsonl:3") and rows[2].gold is None and rows[2].margin is None


def test_kwise_rows_and_their_pairs(tmp_path):
    f = write(tmp_path / "k.jsonl", [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "gold": [0.5, 0, 1]},
        KWISE,
        {"prompt": "q", "responses": ["x", "y"], "ranking": [1, 0], "labeller": "alice"},
    ])
    first, second, third = JsonlComparisons([f]).comparisons(ctx())
    assert first.order == (2, 0, 1) and first.ranked == ["c", "a", "b"] and first.gold == (0.5, 0.0, 1.0)
    assert first.pairs() == [(2, 0), (2, 1), (0, 1)]
    assert second.responses == tuple(KWISE["responses"]) and len(second.pairs()) == 3 and second.gold is None
    assert third.pairs() == [(1, 0)] and third.source.endswith("k.jsonl:3")


def test_parse_comparison_directly():
    r = parse_comparison({"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.5}, "src")
    assert r == Ranking.pair("p", "a", "b", source="src", margin=0.5)
    with pytest.raises(ValueError, match="identical"):
        parse_comparison({"prompt": "p", "chosen": "a", "rejected": "a"}, "src")


BAD_PAIRWISE = [
    ([1, 2], "expected a JSON object, got list"),
    ("{oops", "invalid JSON"),
    ({"prompt": "p", "text": "a"}, "neither chosen\\+rejected nor responses\\+ranking"),
    ({**PAIR, "responses": ["a", "b"], "ranking": [0, 1]}, "both pairwise .* and K-wise"),
    ({"prompt": "p", "chosen": "a"}, "pairwise row has no 'rejected' field"),
    ({"chosen": "a", "rejected": "b"}, "pairwise row has no 'prompt' field"),
    ({**PAIR, "prompt": 3}, "'prompt' must be a string, got int"),
    ({**PAIR, "prompt": [{"role": "user", "content": "2+2?"}]}, "'prompt' is a list.*conversational.*not supported"),
    ({**PAIR, "chosen": MESSAGES}, "'chosen' is a list.*conversational.*flatten"),
    ({**PAIR, "rejected": 5}, "'rejected' must be a string, got int"),
    ({**PAIR, "rejected": "4"}, "'chosen' and 'rejected' are identical"),
    ({**PAIR, "chosen": "  "}, "'chosen' is empty"),
    ({**PAIR, "rejected": ""}, "'rejected' is empty"),
    ({**PAIR, "margin": "big"}, "'margin' must be a number, got str"),
    ({**PAIR, "margin": True}, "'margin' must be a number, got bool"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}', "'margin' must be a finite number"),
    ({**PAIR, "gold_chosen": 1.0}, "'gold_chosen' but no 'gold_rejected'; give both gold scores or neither"),
    ({**PAIR, "gold_rejected": 1.0}, "'gold_rejected' but no 'gold_chosen'"),
    ({**PAIR, "gold_chosen": 1, "gold_rejected": False}, "'gold_rejected' must be a number, got bool"),
    ({**PAIR, "gold": [1, 0]}, "pairwise rows give gold scores as 'gold_chosen' and 'gold_rejected'"),
]
BAD_KWISE = [
    ({"prompt": "p", "responses": ["a", "b"]}, "K-wise row has no 'ranking' field"),
    ({**KWISE, "responses": ["a"], "ranking": [0]}, "at least 2 responses to rank, got 1"),
    ({**KWISE, "responses": "abc"}, "'responses' must be a list of strings, got str"),
    ({**KWISE, "responses": ["a", 3, "c"]}, "responses\\[1\\] must be a string, got int"),
    ({**KWISE, "responses": ["a", MESSAGES, "c"]}, "responses\\[1\\] is a list.*conversational"),
    ({**KWISE, "responses": ["a", "b", " \n"]}, "responses\\[2\\] is empty"),
    ({**KWISE, "responses": ["a", "b", "a"]}, "responses\\[0\\] and responses\\[2\\] are identical"),
    ({**KWISE, "ranking": [0, 0, 1]}, "'ranking' must be a permutation of 0..2 .*best first.*\\[0, 1, 2\\]; got"),
    ({**KWISE, "ranking": [1, 2, 3]}, "permutation of 0..2"),
    ({**KWISE, "ranking": [0, 1]}, "permutation of 0..2"),
    ({**KWISE, "ranking": [0, True, 2]}, "permutation of 0..2"),
    ({**KWISE, "ranking": [0, 1.0, 2]}, "permutation of 0..2"),
    ({**KWISE, "ranking": "012"}, "permutation of 0..2"),
    ({**KWISE, "gold": [1, 2]}, "'gold' must be a list of 3 numbers"),
    ({**KWISE, "gold": [1, "x", 2]}, "gold\\[1\\] must be a number, got str"),
    ({**KWISE, "gold": [True, 0, 1]}, "gold\\[0\\] must be a number, got bool"),
    ({**KWISE, "margin": 1.0}, "'margin' belongs to pairwise rows"),
]


@pytest.mark.parametrize("first,row,message",
                         [(PAIR, row, message) for row, message in BAD_PAIRWISE]
                         + [(KWISE, row, message) for row, message in BAD_KWISE])
def test_bad_rows_name_file_and_line(tmp_path, first, row, message):
    f = write(tmp_path / "d.jsonl", [first, row])
    with pytest.raises(DataError, match=f"d.jsonl:2: .*{message}") as err:
        list(JsonlComparisons(f).comparisons(ctx()))
    assert "dataset.skip_bad_rows=true" in str(err.value)


def test_bad_rows_skipped_on_request_with_a_count_and_the_first(tmp_path):
    f = write(tmp_path / "d.jsonl", [PAIR, {**PAIR, "rejected": "4"}, "{bad", {**PAIR, "chosen": ""},
                                     {**PAIR, "chosen": "four"}])
    with pytest.warns(UserWarning, match="skipped 3 bad comparison row\\(s\\).*the first: .*d.jsonl:2: 'chosen' and"):
        rows = list(JsonlComparisons(f, skip_bad_rows=True).comparisons(ctx()))
    assert [r.source.rsplit(":", 1)[1] for r in rows] == ["1", "5"]


def test_mixed_kinds_are_an_error_even_when_skipping(tmp_path):
    f = write(tmp_path / "d.jsonl", [PAIR, PAIR, KWISE])
    for skip in (False, True):
        with pytest.raises(DataError, match=r"d.jsonl:3: this row is K-wise but \S*d.jsonl:1 is pairwise.*mixes"):
            list(JsonlComparisons(f, skip_bad_rows=skip).comparisons(ctx()))
    # the kind comes from the fields, so a bad row of the other kind is still a mix
    f = write(tmp_path / "e.jsonl", [{**KWISE, "ranking": [0, 0, 0]}, PAIR])
    with pytest.raises(DataError, match=r"e.jsonl:2: this row is pairwise but \S*e.jsonl:1 is K-wise"):
        list(JsonlComparisons(f, skip_bad_rows=True).comparisons(ctx()))


def test_files_of_different_kinds_glob_and_limit(tmp_path):
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "a.jsonl", [PAIR, {**PAIR, "chosen": "four"}])
    write(tmp_path / "data" / "b.jsonl", [KWISE, {**KWISE, "prompt": "again"}])
    pattern = str(tmp_path / "data" / "*.jsonl")
    rows = list(JsonlComparisons(pattern).comparisons(ctx()))
    assert [len(r.responses) for r in rows] == [2, 2, 3, 3]
    assert len(list(JsonlComparisons(pattern, limit=3).comparisons(ctx()))) == 3
    f = write(tmp_path / "bad.jsonl", [{**PAIR, "chosen": ""}, PAIR, {**PAIR, "chosen": "four"}])
    assert len(list(JsonlComparisons(f, skip_bad_rows=True, limit=2).comparisons(ctx()))) == 2  # good rows count


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="no file matches .*nope.jsonl"):
        list(JsonlComparisons(str(tmp_path / "nope.jsonl")).comparisons(ctx()))
    with pytest.raises(DataError, match="no file matches"):
        list(JsonlComparisons([str(tmp_path / "none-*.jsonl")]).comparisons(ctx()))


def test_shared_validator_counts_and_names_the_first_bad_row():
    def parse(row, source):
        if row < 0:
            raise ValueError(f"negative {row}")
        return (row, source)

    rows = [("f", 1, 1, None), ("f", 2, -1, None), ("f", 3, None, "invalid JSON"), ("g#0", None, 2, None)]
    with pytest.warns(UserWarning, match="skipped 2 bad number row\\(s\\).*the first: f:2: negative -1"):
        assert list(validated_rows(rows, parse, True, "number")) == [(1, "f:1"), (2, "g#0")]
    with pytest.raises(DataError, match="f:2: negative -1 \\(add dataset.skip_bad_rows=true"):
        list(validated_rows(rows, parse, False))


def test_saved_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    pairs = str(tmp_path / "pairs")
    datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "chosen": ["x", "y", "z"], "rejected": ["w", "y", "v"],
                                "margin": [1.0, None, 0.5]}).save_to_disk(pairs)
    with pytest.raises(DataError, match=r"pairs\[train\]#1: 'chosen' and 'rejected' are identical"):
        list(SavedComparisons(pairs).comparisons(ctx()))
    with pytest.warns(UserWarning, match=r"skipped 1 bad comparison.*#1"):
        rows = list(SavedComparisons(pairs, skip_bad_rows=True).comparisons(ctx()))
    assert [(r.prompt, r.margin, r.source) for r in rows] == [("a", 1.0, f"{pairs}[train]#0"),
                                                              ("c", 0.5, f"{pairs}[train]#2")]
    assert len(list(SavedComparisons(pairs, skip_bad_rows=True, limit=1).comparisons(ctx()))) == 1

    kwise = str(tmp_path / "kwise")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({
        "prompt": ["p"], "responses": [["a", "b", "c"]], "ranking": [[2, 0, 1]], "gold": [[0.5, 0.0, 1.0]],
    })}).save_to_disk(kwise)
    (r,) = SavedComparisons(kwise, split="test").comparisons(ctx())
    assert r.pairs() == [(2, 0), (2, 1), (0, 1)] and r.gold == (0.5, 0.0, 1.0) and r.source == f"{kwise}[test]#0"
    with pytest.raises(DataError, match="has splits \\['test'\\], not 'train'"):
        list(SavedComparisons(kwise).comparisons(ctx()))

    mixed = str(tmp_path / "mixed")
    datasets.Dataset.from_dict({"prompt": ["p", "q"], "chosen": ["a", None], "rejected": ["b", None],
                                "responses": [None, ["x", "y"]], "ranking": [None, [1, 0]]}).save_to_disk(mixed)
    with pytest.raises(DataError, match=r"mixed\[train\]#1: this row is K-wise but \S*#0 is pairwise"):
        list(SavedComparisons(mixed, skip_bad_rows=True).comparisons(ctx()))


def test_configs_instantiate_as_comparison_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    f = write(tmp_path / "d.jsonl", [PAIR])
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/dataset/comparisons_jsonl.yaml"), {"paths": [f]})
    ds = instantiate_plugin(cfg, "dataset", ComparisonDataset)
    assert isinstance(ds, JsonlComparisons) and not ds.needs_policy and ds.limit is None and not ds.skip_bad_rows
    assert [r.ranked for r in ds.comparisons(ctx())] == [["4", "5"]] and "d.jsonl" in ds.describe()

    saved = str(tmp_path / "saved")
    datasets.Dataset.from_dict({k: [v] for k, v in PAIR.items()}).save_to_disk(saved)
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/dataset/comparisons_hf_disk.yaml"), {"path": saved, "limit": 5})
    ds = instantiate_plugin(cfg, "dataset", ComparisonDataset)
    assert isinstance(ds, SavedComparisons) and not ds.needs_policy and ds.split == "train" and ds.limit == 5
    assert len(list(ds.comparisons(ctx()))) == 1 and saved in ds.describe()


def test_policy_comparisons_skip_groups_without_two_distinct_responses_and_split_by_prompt():
    from plugins.datasets.policy_comparisons import PolicyComparisons
    from plugins.labellers.synthetic import SyntheticLabeller
    from plugins.rewards.length import Length
    from plugins.tasks.chitchat_reply import FriendlyReply

    def sample(prompts, k, max_new_tokens, temperature):  # prompt 1's samples are all alike: nothing to compare
        return [["same"] * k if i == 1 else [f"{'x' * (i + 1)}", "a much longer reply", "a much longer reply"]
                for i in range(len(prompts))]

    ctx = ComparisonContext(sample=sample, task=FriendlyReply(), labeller=SyntheticLabeller(Length(), tau=0.0), seed=0)
    ds = PolicyComparisons(n=3, k=3, heldout=2)
    train, held = list(ds.comparisons(ctx)), list(ds.validation(ctx))
    assert ds.skipped == 1
    assert [r.source for r in train] == ["friendly_reply:0", "friendly_reply:2"]  # prompt 1 skipped, n cut at 3 prompts
    assert [r.source for r in held] == ["friendly_reply:3", "friendly_reply:4"]
    for r in train + held:
        assert len(r.responses) == 2 and r.responses[r.order[0]] == "a much longer reply"  # duplicates dropped
        assert r.gold == tuple(0.01 * len(x) for x in r.responses)
