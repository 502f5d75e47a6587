import pytest

import json
from pathlib import Path

from framework.data import hash_fraction, hash_split, pack_token_stream, split_records


def test_hash_split_is_seeded_and_independent_of_order():
    items = [f"doc {i}" for i in range(1000)]
    train, val = hash_split(items, 0.1, seed=7, key=str)
    assert 60 < len(val) < 140 and len(train) + len(val) == 1000
    train_r, val_r = hash_split(list(reversed(items)), 0.1, seed=7, key=str)
    assert set(val_r) == set(val)  # not positional: reordering moves nothing
    _, val_other_seed = hash_split(items, 0.1, seed=8, key=str)
    assert set(val_other_seed) != set(val)


def test_hash_split_never_leaves_validation_empty():
    train, val = hash_split(["a", "b"], 0.01, seed=0, key=str)
    assert len(val) == 1 and len(train) == 1
    with pytest.raises(ValueError):
        hash_split(["a"], 1.0, seed=0, key=str)


def test_pack_token_stream_appends_eos_and_drops_the_tail():
    blocks = pack_token_stream([[1, 2, 3], [4, 5], [6]], eos_id=0, seq_len=4)
    # stream: 1 2 3 0 4 5 0 6 0 -> two full blocks, tail [0] dropped
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert pack_token_stream([[1]], eos_id=0, seq_len=4) == []


def test_records_split_by_content_not_by_where_they_were_read(tmp_path):
    """The split key used to hold the file's path and line: the same data in another folder, or with a row added
    on top, gave another validation set (and a CI machine's tmp folder decided a test)."""
    from plugins.datasets.demonstrations import JsonlDemonstrations
    rows = [json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) for i in range(200)]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "d.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join([json.dumps({"prompt": "new", "response": "row"}), *rows]) + "\n")
    first = split_records(list(JsonlDemonstrations(str(tmp_path / "a" / "d.jsonl")).demonstrations()), 0.2, seed=5)
    moved = split_records(list(JsonlDemonstrations(str(tmp_path / "b.jsonl")).demonstrations()), 0.2, seed=5)
    texts = [{d.text() for d in part} for part in first]
    assert 10 < len(texts[1]) < 70
    assert [{d.text() for d in part} - {"new\nrow"} for part in moved] == texts
    twice = split_records(list(JsonlDemonstrations([str(tmp_path / "a" / "d.jsonl")] * 2).demonstrations()), 0.2, seed=5)
    assert not {d.text() for d in twice[0]} & {d.text() for d in twice[1]}  # a duplicate stays on one side
    held = ["h"]
    assert split_records(["x", "y"], 0.5, seed=0, heldout=held) == (["x", "y"], ["h"])


def test_a_duplicate_never_straddles_the_split():
    """Fails when the fallback that keeps validation non-empty moved one copy of a record and trained on the others,
    or when one pair labelled both ways (two labellers disagreeing) could land on both sides."""
    from framework.records import Ranking

    items = [f"doc {i}" for i in range(4)] * 2
    train, val = hash_split(items, 0.01, seed=0, key=str)
    assert len(val) == 2 and not set(val) & set(train) and len(train) == 6
    assert val[0] == min(items, key=lambda k: hash_fraction(k, 0))  # the one that joins first as val_fraction grows
    assert hash_split(["same", "same"], 0.01, seed=0, key=str) == (["same", "same"], [])  # one record: no split
    both_ways = [Ranking.pair(f"p{i}", "a", "b") for i in range(50)] + [Ranking.pair(f"p{i}", "b", "a") for i in range(50)]
    train_r, val_r = split_records(both_ways, 0.3, seed=1)
    assert val_r and not {r.prompt for r in train_r} & {r.prompt for r in val_r}


def _validation_shares(rank: int, world: int, out_dir: str) -> None:
    import torch
    from torch.utils.data import DataLoader
    from torchmetrics import CatMetric, MeanMetric

    from framework.distributed import ValidationShare

    torch.distributed.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                                         world_size=world)
    try:
        seen = {}
        for n, batches in ((7, None), (1, None), (9, 3)):
            loader = DataLoader(list(range(n)), batch_size=2, sampler=ValidationShare(n, batches, batch_size=2))
            mean, items = MeanMetric(), CatMetric()
            for batch in loader:  # what a validation_step gives torchmetrics; compute() sums over the processes
                mean.update(batch.float())
                items.update(batch.float())
            seen[n] = {"mean": float(mean.compute()), "items": sorted(items.compute().tolist()),
                       "batches": len(loader)}
        (Path(out_dir) / f"seen{rank}.json").write_text(json.dumps(seen))
    finally:
        torch.distributed.destroy_process_group()


def test_validation_under_two_processes_scores_every_item_once(tmp_path):
    """ValidationShare: Lightning's DistributedSampler would give 7 items over 2 processes as 4 + 4, the first item
    twice; here the processes take 4 + 3, and the metrics' sums hold each item once. With fewer items than
    processes each process takes them all (none left without a batch), which keeps the mean. A stage's val_batches
    caps the items over all processes, not each process's batches."""
    import torch.multiprocessing as mp
    from torch.utils.data import DistributedSampler

    from framework.distributed import ValidationShare

    # Lightning keeps a DistributedSampler it is given; in one process the share is every item, in order
    assert isinstance(ValidationShare(3), DistributedSampler) and list(ValidationShare(3)) == [0, 1, 2]
    assert list(ValidationShare(7, batches=2, batch_size=2)) == [0, 1, 2, 3]
    assert list(ValidationShare(3, batches=4, batch_size=2)) == [0, 1, 2] and len(ValidationShare(5, 0, 2)) == 5
    mp.spawn(_validation_shares, args=(2, str(tmp_path)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in range(2)]
    for s in seen:
        assert s["7"]["mean"] == 3.0 and s["7"]["items"] == [float(i) for i in range(7)]
        assert s["1"]["mean"] == 0.0 and s["1"]["items"] == [0.0, 0.0]
        assert s["9"]["mean"] == 2.5 and s["9"]["items"] == [float(i) for i in range(6)]
    assert [s["7"]["batches"] for s in seen] == [2, 2] and [s["1"]["batches"] for s in seen] == [1, 1]
