"""Pointer recurrence: the rule on every scored position (independent loop), masks, fresh-token rate."""
import pytest
import torch
from taskcheck import check_pointer, full_sequences

from expressive_attention.tasks import LADDERS, make_task, train_generator


@pytest.mark.parametrize("i", range(len(LADDERS["pointer"])))
def test_rule_on_ladder(i):
    task = make_task("pointer", **LADDERS["pointer"][i])
    check_pointer(task, *task.sample(24, train_generator(i)))


@pytest.mark.parametrize("T,V,p", [(1, 2, 0.0), (3, 5, 0.3), (7, 7, 0.05), (16, 16, 0.5)])
def test_rule_and_fresh_rate(T, V, p):
    task = make_task("pointer", T=T, V=V, p=p, seq_len=48)
    x, y, m = task.sample(200, torch.Generator().manual_seed(1))  # no split: T=1, p=0 has 2 sequences
    fresh, broken = check_pointer(task, x, y, m)
    ruled = 200 * (48 + 1 - T)  # full positions T..48
    assert abs(fresh / ruled - p) < 0.02
    if p > 0:  # fresh tokens are uniform: the rule breaks at about 1 - 1/V of them
        assert abs(broken / fresh - (1 - 1 / V)) < 0.06
    s = full_sequences(x, y)
    assert set(s[:, :T].flatten().tolist()) == set(range(V))


def test_pointer_uses_every_lag():
    task = make_task("pointer", T=8, V=16, p=0.0, seq_len=40)
    x, y, _ = task.sample(64, train_generator(0))
    lags = {1 + v % 8 for v in x[:, 8:].flatten().tolist()}
    assert lags == set(range(1, 9))


@pytest.mark.parametrize("kw,err", [(dict(T=0), "T must be"), (dict(T=8, V=4), "V must be >= T"),
                                    (dict(p=1.0), "p must be"), (dict(p="x"), "p must be"),
                                    (dict(T=8, seq_len=4), "seq_len")])
def test_errors(kw, err):
    with pytest.raises((ValueError, TypeError), match=err):
        make_task("pointer", **kw)
