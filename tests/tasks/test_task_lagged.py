"""Lagged recurrences: the rule on every scored position (independent loop), masks, lags, errors."""
import pytest
import torch
from taskcheck import check_lagged_digits, check_lagged_sum

from expressive_attention.tasks import LADDERS, draw_lags, make_task, train_generator


@pytest.mark.parametrize("i", range(len(LADDERS["lagged"])))
def test_sum_rule_on_ladder(i):
    task = make_task("lagged", **LADDERS["lagged"][i])
    check_lagged_sum(task, *task.sample(24, train_generator(i)))


@pytest.mark.parametrize("i", range(len(LADDERS["lagged_digits"])))
def test_digits_rule_on_ladder(i):
    task = make_task("lagged_digits", **LADDERS["lagged_digits"][i])
    check_lagged_digits(task, *task.sample(24, train_generator(i)))


@pytest.mark.parametrize("kw", [dict(N=3, T=5, V=16, seq_len=20), dict(lags=[2, 3, 7], V=7, T=7, seq_len=33),
                                dict(N=1, T=1, V=3, seq_len=5), dict(N=4, T=6, V=5, n_start=9, seq_len=30)])
def test_sum_rule_other_params(kw):
    task = make_task("lagged", **kw)
    x, y, m = task.sample(32, torch.Generator().manual_seed(0))  # no split: tiny spaces (e.g. 3 sequences)
    check_lagged_sum(task, x, y, m)
    start = torch.cat([x[:, : task.n_start]]).flatten()
    assert set(start.tolist()) == set(range(task.V))  # start tokens range over the whole vocabulary


def test_digits_rule_other_base_and_each_lag_fixes_one_digit():
    task = make_task("lagged_digits", lags=[1, 2, 4], T=4, base=3, seq_len=40)
    assert task.vocab_size == 27
    x, y, m = task.sample(32, train_generator(1))
    check_lagged_digits(task, x, y, m)
    # knowing only lag t_1's token fixes the lowest digit of the target: one lag alone carries signal
    s = torch.cat([x, y[:, -1:]], 1)
    assert torch.equal(s[:, 4:] % 3, s[:, 3:-1] % 3)


def test_lags_drawn_nested_and_explicit():
    assert draw_lags(3, 8, 0) == draw_lags(3, 8, 0)
    for n in range(1, 8):
        assert set(draw_lags(n, 8, 0)) <= set(draw_lags(n + 1, 8, 0))
    lags = [make_task("lagged", **r).lags for r in LADDERS["lagged"]]
    assert all(set(a) <= set(b) for a, b in zip(lags, lags[1:]))
    task = make_task("lagged", N=3, T=8, lag_seed=5)
    assert task.lags == draw_lags(3, 8, 5) and task.params()["lags"] == task.lags
    assert make_task("lagged", lags=[1, 4], T=4).N == 2


def test_sum_mask_marks_exactly_the_ruled_positions():
    task = make_task("lagged", lags=[1, 2], T=3, V=4, n_start=5, seq_len=9)
    _, _, m = task.sample(4, train_generator(0))
    assert m.tolist() == [[False] * 4 + [True] * 5] * 4  # full positions 5..9 are ruled


@pytest.mark.parametrize("kw,err", [
    (dict(lags=[1, 2], lag_seed=0), "lags or lag_seed"),
    (dict(N=3, lags=[1, 2]), "len\\(lags\\)"),
    (dict(lags=[2, 1]), "strictly increasing"),
    (dict(lags=[1, 9], T=8), "lags\\[\\]"),
    (dict(N=9, T=8), "N must be <="),
    (dict(V=1), "V must be >="),
    (dict(T=8, n_start=4), "n_start"),
    (dict(T=8, seq_len=5), "seq_len"),
    (dict(N=2.0), "N must be an int"),
])
def test_sum_errors(kw, err):
    with pytest.raises((ValueError, TypeError), match=err):
        make_task("lagged", **kw)


def test_digits_errors():
    with pytest.raises(ValueError, match="base must be >="):
        make_task("lagged_digits", N=2, base=1)
    with pytest.raises(ValueError, match="base\\*\\*N"):
        make_task("lagged_digits", N=8, T=8, base=4)
