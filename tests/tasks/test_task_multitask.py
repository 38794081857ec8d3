"""Multi-task mixture: task token, per-task groups, every sub-task rule, split kept, errors."""
import pytest
import torch
from taskcheck import CHECKS

from expressive_attention.tasks import LADDERS, eval_generator, make_task, train_generator

SPECS = [{"name": "pointer", "T": 4}, {"name": "recall", "K": 3}, {"name": "lagged", "lags": [1, 3], "V": 3}]


@pytest.mark.parametrize("task_token", [True, False])
def test_groups_tokens_and_sub_rules(task_token):
    task = make_task("multitask", tasks=SPECS, task_token=task_token, seq_len=40)
    assert task.seq_len == 40 and len(task.score_groups()) == 3
    assert task.vocab_size == 33 + 3 * task_token
    x, y, m, g = task.sample_with_groups(90, train_generator(0))
    assert g.shape == x.shape and (g == g[:, :1]).all()
    counts = torch.bincount(g[:, 0], minlength=3)
    assert (counts >= 15).all()
    for i, sub in enumerate(task.tasks):
        rows = g[:, 0] == i
        xi, yi, mi = x[rows], y[rows], m[rows]
        if task_token:
            assert (xi[:, 0] == 33 + i).all() and not mi[:, 0].any()
            assert torch.equal(yi[:, 0], xi[:, 1])
            xi, yi, mi = xi[:, 1:], yi[:, 1:], mi[:, 1:]
        CHECKS[sub.name](sub, xi, yi, mi)
    x2, y2, m2 = task.sample(90, train_generator(0))
    assert torch.equal(x, x2) and torch.equal(m, m2)


def test_weights_and_names():
    task = make_task("multitask", tasks=[SPECS[0], SPECS[0], SPECS[1]], weights=[1, 0, 3], seq_len=30)
    names = task.score_groups()
    assert len(set(names)) == 3 and names[0].startswith("0:")
    _, _, _, g = task.sample_with_groups(400, train_generator(0))
    c = torch.bincount(g[:, 0], minlength=3)
    assert c[1] == 0 and 0.65 < c[2] / 400 < 0.85


def test_notoken_variant_and_ladder():
    a = make_task("multitask_notoken", **LADDERS["multitask_notoken"][1])
    assert a.task_token is False and "task_token" not in a.params()
    b = make_task("multitask", **LADDERS["multitask"][1])
    assert b.task_token and b.vocab_size == a.vocab_size + 3
    xa, _, _ = a.sample(32, eval_generator(0))
    xb, _, _ = b.sample(32, eval_generator(0))
    assert (xb[:, 0] >= a.vocab_size).all() and (xa < a.vocab_size).all()


@pytest.mark.parametrize("kw,err", [
    (dict(tasks=[]), "non-empty list"),
    (dict(tasks=[{"T": 4}]), "tasks\\[0\\]"),
    (dict(tasks=[{"name": "multitask", "tasks": SPECS}]), "nested"),
    (dict(tasks=[{"name": "pointer", "seq_len": 10}, {"name": "recall", "seq_len": 12}]), "one seq_len"),
    (dict(tasks=[{"name": "pointer", "seq_len": 10}], seq_len=10), "does not match"),
    (dict(tasks=SPECS, weights=[1, 2]), "weights"),
    (dict(tasks=SPECS, weights=3), "weights"),
    (dict(tasks=SPECS, weights=[1, -1, 1]), "weights"),
    (dict(tasks=SPECS, task_token=1), "task_token"),
])
def test_errors(kw, err):
    with pytest.raises((ValueError, TypeError), match=err):
        make_task("multitask", **kw)
