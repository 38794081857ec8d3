"""Associative recall (MQAR-like): answers are the queried keys' values, only answers scored."""
import pytest
from taskcheck import check_recall

from expressive_attention.tasks import LADDERS, make_task, train_generator
from expressive_attention.tasks.ladders import DENSE_RECALL, recall_rungs, recall_slots


@pytest.mark.parametrize("i", range(len(LADDERS["recall"])))
def test_rule_on_ladder(i):
    task = make_task("recall", **LADDERS["recall"][i])
    check_recall(task, *task.sample(24, train_generator(i)))


@pytest.mark.parametrize("kw", [dict(K=5, n_keys=5, n_values=3, seq_len=21), dict(K=3, Q=7, seq_len=40),
                                dict(K=8, n_keys=64, n_values=64, Q=2, seq_len=31), dict(K=1, seq_len=3)])
def test_rule_other_params(kw):
    task = make_task("recall", **kw)
    check_recall(task, *task.sample(40, train_generator(2)))


def test_query_positions_vary():
    task = make_task("recall", K=2, seq_len=64)
    x, y, m = task.sample(64, train_generator(0))
    first = m.float().argmax(1)
    assert len(set(first.tolist())) > 5


@pytest.mark.parametrize("kw,err", [(dict(K=0), "K must be"), (dict(K=5, n_keys=4), "n_keys"),
                                    (dict(K=8, seq_len=20), "too short"), (dict(n_values=1), "n_values")])
def test_errors(kw, err):
    with pytest.raises((ValueError, TypeError), match=err):
        make_task("recall", **kw)


@pytest.mark.parametrize("i", range(len(DENSE_RECALL)))
def test_dense_layout_every_slot_is_a_query(i):
    rung = DENSE_RECALL[i]
    task = make_task("recall", **rung)
    x, y, m = task.sample(24, train_generator(i))
    check_recall(task, x, y, m)
    K = rung["K"]
    assert rung["Q"] == recall_slots(K, 64) == (65 - 2 * K) // 2
    # after the K pairs: a key at every even position, its scored answer right after, no filler
    keys = x[:, 2 * K::2]
    assert ((keys >= 1) & (keys <= rung["n_keys"])).all()
    assert m.sum(1).eq(rung["Q"]).all()
    assert recall_rungs([2], 16, 8) == [{"K": 2, "Q": 8, "n_keys": 16, "n_values": 16, "seq_len": 64}]
