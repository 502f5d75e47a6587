"""Text corpus plugins: chitchat, local files (txt/jsonl, globs), saved `datasets` folders; bad input errors."""

import json

import pytest

from framework.errors import DataError
from plugins.datasets.chitchat import ChitchatCorpus
from plugins.datasets.hf_disk import HFDiskText
from plugins.datasets.text_files import TextFiles


def test_chitchat_yields_real_conversations():
    docs = list(ChitchatCorpus(max_documents=5).texts())
    assert len(docs) == 5
    assert all(d.text.strip() and d.source.startswith("chitchat:") for d in docs)
    assert sum("\n" in d.text for d in docs) >= 3  # turns, one per line
    assert len(list(ChitchatCorpus().texts())) > 7000


def test_text_files_reads_txt_blocks_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "row one"}) + "\n\n" + json.dumps({"text": "row two"}) + "\n")
    docs = list(TextFiles(paths=[str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl")]).texts())
    assert [d.text for d in docs] == ["first doc\nstill first", "second doc", "row one", "row two"]
    assert docs[3].source.endswith("b.jsonl:3")


def test_jsonl_row_without_field_names_file_and_line(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:2: row has no 'text' field"):
        list(TextFiles(paths=[str(f)]).texts())
    f.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"c\.jsonl:2: invalid JSON"):
        list(TextFiles(paths=[str(f)]).texts())


def test_bad_rows_can_be_skipped_and_are_counted(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"x": 1}) + "\n" + json.dumps({"text": 3}) + "\n")
    with pytest.warns(UserWarning, match="skipped 2 bad row"):
        docs = list(TextFiles(paths=[str(f)], skip_bad_rows=True).texts())
    assert [d.text for d in docs] == ["ok"]


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(DataError, match="no file matches"):
        list(TextFiles(paths=[str(tmp_path / "nothing" / "*.txt")]).texts())
    with pytest.raises(DataError, match="no file matches"):
        list(TextFiles(paths=[str(tmp_path / "missing.txt")]).texts())
    with pytest.raises(DataError, match="is a directory"):
        list(TextFiles(paths=[str(tmp_path)]).texts())
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        list(TextFiles(paths=[str(tmp_path / "d.csv")]).texts())
    with pytest.raises(DataError, match="paths is empty"):
        list(TextFiles(paths=[]).texts())


def test_hf_disk_dataset_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["alpha", "beta"], "n": [1, 2]}),
         "test": datasets.Dataset.from_dict({"text": ["gamma"], "n": [3]})}
    ).save_to_disk(str(tmp_path / "ds"))
    assert [d.text for d in HFDiskText(str(tmp_path / "ds")).texts()] == ["alpha", "beta"]
    assert [d.text for d in HFDiskText(str(tmp_path / "ds"), split="test").texts()] == ["gamma"]
    with pytest.raises(DataError, match="has splits"):
        list(HFDiskText(str(tmp_path / "ds"), split="validation").texts())
    with pytest.raises(DataError, match="no column 'body'"):
        list(HFDiskText(str(tmp_path / "ds"), text_field="body").texts())
    with pytest.raises(DataError, match="not a folder written by"):
        list(HFDiskText(str(tmp_path / "nope")).texts())


def test_empty_corpus_stops_the_stage(tmp_path):
    from omegaconf import OmegaConf

    from framework.stages.pretrain import PretrainStage

    (tmp_path / "empty.txt").write_text("\n\n   \n")
    cfg = OmegaConf.create({"seed": 0, "dataset": {"_target_": "plugins.datasets.text_files.TextFiles",
                                                     "paths": [str(tmp_path / "empty.txt")]}})
    with pytest.raises(DataError, match="no documents with text"):
        PretrainStage().load_corpus(cfg)
