import json
import warnings

import pytest

from expressive_attention.experiments.results import ResultsStore, config_key


def _rec(i):
    cfg = {"task": "t", "seed": i}
    return {"key": config_key(cfg), "config": cfg, "metrics": {"token_acc": i / 10}}


def test_config_key_is_stable_and_order_free():
    assert config_key({"a": 1, "b": [1, 2]}) == config_key({"b": [1, 2], "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2})
    assert len(config_key({})) == 16


def test_append_read_roundtrip(tmp_path):
    store = ResultsStore(tmp_path)
    assert store.path == tmp_path / "results.jsonl"
    assert store.read() == []
    for i in range(3):
        store.append(_rec(i))
    assert [r["config"]["seed"] for r in store.read()] == [0, 1, 2]
    assert store.keys() == {_rec(i)["key"] for i in range(3)}
    with pytest.raises(ValueError, match="key"):
        store.append({"config": {}})


def test_truncated_last_line_is_dropped_with_warning_and_repaired(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_rec(0))
    store.append(_rec(1))
    full = json.dumps(_rec(2))
    with open(store.path, "a") as f:  # a writer killed mid-line
        f.write(full[: len(full) // 2])
    with pytest.warns(RuntimeWarning, match="truncated"):
        assert [r["config"]["seed"] for r in store.read()] == [0, 1]
    with pytest.warns(RuntimeWarning, match="truncated"):
        removed = store.repair()
    assert removed == len(full) // 2
    store.append(_rec(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clean file now: no warning
        assert [r["config"]["seed"] for r in store.read()] == [0, 1, 2]
    assert store.repair() == 0


def test_complete_json_without_newline_counts_as_torn(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_rec(0))
    with open(store.path, "a") as f:
        f.write(json.dumps(_rec(1)))  # the newline never made it
    with pytest.warns(RuntimeWarning):
        assert len(store.read()) == 1


def test_corrupt_middle_line_and_duplicates(tmp_path):
    store = ResultsStore(tmp_path / "r.jsonl")
    store.append(_rec(0))
    with open(store.path, "a") as f:
        f.write("{not json\n")
    store.append(_rec(1))
    with pytest.warns(RuntimeWarning, match="not writing a duplicate"):
        assert not store.append(_rec(0) | {"metrics": {"token_acc": 9}})  # refused
    with open(store.path, "a") as f:  # a duplicate line as written by an older version: first wins
        f.write(json.dumps(_rec(0) | {"metrics": {"token_acc": 9}}) + "\n")
    with pytest.warns(RuntimeWarning, match=":2:"):
        recs = store.read()
    assert [r["config"]["seed"] for r in recs] == [0, 1]
    assert recs[0]["metrics"]["token_acc"] == 0.0


def test_serialised_waits_for_the_other_writer(tmp_path):
    """Two writers of one folder (e.g. two `ea lm` workers sharing a queue): the second waits until
    the first has released the write lock."""
    import threading
    import time

    from expressive_attention.experiments.results import serialised

    events = []

    def second():
        with serialised(tmp_path):
            events.append("second in")

    with serialised(tmp_path):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        events.append("first out")
    t.join(10)
    assert events == ["first out", "second in"]
