"""Demonstration datasets: jsonl prompt/response and messages rows validated row by row; chitchat; saved datasets."""

import json

import pytest

from framework.errors import DataError
from plugins.datasets.demonstrations import ChitchatDemonstrations, HFDiskDemonstrations, JsonlDemonstrations


def write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_jsonl_pairs_and_conversations(tmp_path):
    f = write(tmp_path / "d.jsonl", [
        {"prompt": "hi", "response": "hello"},
        {"prompt": "trl style", "completion": " row"},
        {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                      {"role": "assistant", "content": "d"}]},
    ])
    demos = list(JsonlDemonstrations(f).demonstrations())
    assert demos[0].as_messages() == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert demos[1].response == " row"
    assert [m["role"] for m in demos[2].as_messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert demos[2].source.endswith("d.jsonl:3")


@pytest.mark.parametrize("row,message", [
    ({"prompt": "hi", "response": "  "}, "d.jsonl:2: empty response"),
    ({"prompt": "hi"}, "d.jsonl:2: row has no 'response' field"),
    ({"prompt": "hi", "response": 3}, "'response' must be a string"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages\\[0\\].role is 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no non-empty assistant turn"),
    ({"messages": [], "prompt": "x", "response": "y"}, "both prompt/response and messages"),
    ("{oops", "d.jsonl:2: invalid JSON"),
    ([1, 2], "expected a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    f = write(tmp_path / "d.jsonl", [{"prompt": "ok", "response": "fine"}, row])
    with pytest.raises(DataError, match=message):
        list(JsonlDemonstrations(f).demonstrations())


def test_max_demonstrations_takes_the_first_n_and_refuses_less_than_one(tmp_path):
    from framework.errors import ConfigError

    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "response": "a"}) + "\n" for i in range(5)))
    assert [d.prompt for d in JsonlDemonstrations(str(f), max_demonstrations=2).demonstrations()] == ["q0", "q1"]
    for bad in (-1, 0):  # -1 failed in itertools.islice once the rows were read
        with pytest.raises(ConfigError, match=rf"dataset.max_demonstrations={bad} must be >= 1 \(null: all"):
            JsonlDemonstrations(str(f), max_demonstrations=bad)


def test_bad_rows_skipped_on_request_with_a_count(tmp_path):
    f = write(tmp_path / "d.jsonl", [{"prompt": "ok", "response": "fine"}, {"prompt": "x", "response": ""}, "{bad"])
    with pytest.warns(UserWarning, match="skipped 2 bad demonstration"):
        assert len(list(JsonlDemonstrations(f, skip_bad_rows=True).demonstrations())) == 1


def test_chitchat_as_conversations():
    one_side = list(ChitchatDemonstrations(max_conversations=3, max_turns=4, both_sides=False).demonstrations())
    assert len(one_side) == 3
    for d in one_side:
        roles = [m["role"] for m in d.as_messages()]
        assert roles[:2] == ["user", "assistant"] and 2 <= len(roles) <= 4
    both = list(ChitchatDemonstrations(max_conversations=3, max_turns=4).demonstrations())
    assert len(both) == 6  # every turn is an assistant turn in one of the two copies
    first, second = both[0].as_messages(), both[1].as_messages()
    assert [m["content"] for m in first] == [m["content"] for m in second]
    assert [m["role"] for m in second][:2] == ["assistant", "user"]


def test_saved_dataset_demonstrations(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"prompt": ["a", "b"], "response": ["x", ""]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match="empty response"):
        list(HFDiskDemonstrations(str(tmp_path / "ds")).demonstrations())
    with pytest.warns(UserWarning):
        assert len(list(HFDiskDemonstrations(str(tmp_path / "ds"), skip_bad_rows=True).demonstrations())) == 1
