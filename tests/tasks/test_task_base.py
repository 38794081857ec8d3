"""Registry, parameters, shapes, seeds and the train/eval split of every ladder rung."""
import json

import pytest
import torch

from expressive_attention.tasks import (LADDERS, TASKS, Task, eval_generator, in_eval_split, ladder, make_task,
                                        register_task, train_generator)

ALL_RUNGS = [(name, i) for name in LADDERS for i in range(len(LADDERS[name]))]


def test_every_family_has_a_ladder_of_at_least_5_rungs():
    for fam in ("pointer", "lagged", "lagged_digits", "recall", "multitask", "multitask_notoken"):
        assert fam in TASKS and len(LADDERS[fam]) >= 5


@pytest.mark.parametrize("name,i", ALL_RUNGS)
def test_rung_params_shapes_and_seeds(name, i):
    task = make_task(name, **LADDERS[name][i])
    p = task.params()
    assert json.loads(json.dumps(p)) == p
    again = make_task(name, **p)
    assert again.params() == p and again.describe() == task.describe() and task.name == name
    x, y, m = task.sample(16, train_generator(3))
    for t in (x, y, m):
        assert t.shape == (16, task.seq_len)
    assert x.dtype == y.dtype == torch.long and m.dtype == torch.bool
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert 0 <= int(x.min()) and int(max(x.max(), y.max())) < task.vocab_size
    assert m.any()
    x2, y2, m2 = again.sample(16, train_generator(3))  # same params + seed -> same batch
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(m, m2)
    x3, _, _ = task.sample(16, train_generator(4))
    assert not torch.equal(x, x3)
    if task.score_groups() is None:
        _, _, _, g = task.sample_with_groups(4, train_generator(0))
        assert g.shape == (4, task.seq_len) and (g == 0).all()


def test_streams_reproduce_and_continue():
    task = make_task("pointer", T=4)
    g1, g2 = train_generator(7), train_generator(7)
    a, b = [task.sample(8, g1)[0] for _ in range(2)], [task.sample(8, g2)[0] for _ in range(2)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], a[1])
    assert not torch.equal(task.sample(8, eval_generator(7))[0], a[0])
    assert not torch.equal(task.sample(8, train_generator(8))[0], a[0])


@pytest.mark.parametrize("name,i", [(n, 0) for n in LADDERS] + [("lagged", 5), ("recall", 4), ("multitask", 4)])
def test_train_and_eval_streams_are_disjoint(name, i):
    task = make_task(name, **LADDERS[name][i])
    train = torch.cat([task.sample(256, train_generator(s))[0] for s in range(4)])
    evals = torch.cat([task.sample(256, eval_generator(s))[0] for s in range(2)])
    assert not set(map(tuple, train.tolist())) & set(map(tuple, evals.tolist()))
    if task.score_groups() is None or not getattr(task, "task_token", True):
        assert not in_eval_split(train).any() and in_eval_split(evals).all()


def test_split_has_teeth_on_a_tiny_sequence_space():
    # lagged V=2 with 4 start tokens has only 16 distinct sequences: random draws collide ...
    task = make_task("lagged", lags=[1, 3], T=4, V=2, seq_len=12)
    g = torch.Generator().manual_seed(0)
    a, b = task.sample(64, g)[0], task.sample(64, g)[0]
    assert set(map(tuple, a.tolist())) & set(map(tuple, b.tolist()))
    # ... the split streams never do, and together they cover the whole space
    tr = {tuple(r) for s in range(3) for r in task.sample(64, train_generator(s))[0].tolist()}
    ev = {tuple(r) for s in range(3) for r in task.sample(64, eval_generator(s))[0].tolist()}
    assert not tr & ev and len(tr | ev) == 16 and len(tr) >= 3 and len(ev) >= 3


def test_split_hash_is_balanced():
    x = torch.randint(0, 16, (4000, 64), generator=torch.Generator().manual_seed(0))
    assert 0.45 < in_eval_split(x).float().mean().item() < 0.55
    x = torch.randint(0, 2, (4000, 9), generator=torch.Generator().manual_seed(1))
    assert 0.45 < in_eval_split(x).float().mean().item() < 0.55


def test_too_small_sequence_space_raises_instead_of_looping():
    # lagged lags=[1], T=1, V=2 has 2 sequences (all 0, all 1); pick a length where both share a split
    for L in range(2, 64):
        split = in_eval_split(torch.tensor([[0] * L, [1] * L]))
        if bool(split[0]) == bool(split[1]):
            break
    task = make_task("lagged", lags=[1], T=1, V=2, seq_len=L)
    ok, empty = (eval_generator(0), train_generator(0)) if split[0] else (train_generator(0), eval_generator(0))
    assert task.sample(4, ok)[0].shape == (4, L)
    with pytest.raises(RuntimeError, match="too few distinct sequences"):
        task.sample(4, empty)


def test_plain_generator_samples_without_split():
    task = make_task("pointer", T=4)
    x = task.sample(400, torch.Generator().manual_seed(0))[0]
    frac = in_eval_split(x).float().mean().item()
    assert 0.35 < frac < 0.65


def test_user_task_registration():
    @register_task("test_const_step")
    class Step(Task):
        vocab_size = 5

        def __init__(self, seq_len=10):
            self.seq_len = seq_len

        def params(self):
            return {"seq_len": self.seq_len}

        def describe(self):
            return "step"

        def _sample_raw(self, n, generator):  # random even positions, odd = previous + 1 mod 5
            s = torch.randint(0, 5, (n, self.seq_len + 1), generator=generator)
            s[:, 1::2] = (s[:, 0:-1:2] + 1) % 5
            d = torch.zeros_like(s, dtype=torch.bool)
            d[:, 1::2] = True
            return s, d

    try:
        task = make_task("test_const_step", seq_len=6)
        assert TASKS["test_const_step"] is Step and task.name == "test_const_step"
        x, y, m = task.sample(3, eval_generator(0))
        assert torch.equal(y[:, ::2], (x[:, ::2] + 1) % 5) and m[:, ::2].all() and not m[:, 1::2].any()
        assert in_eval_split(x).all()
        with pytest.raises(ValueError, match="already registered"):
            register_task("test_const_step")(type("Other", (Step,), {}))
    finally:
        TASKS.pop("test_const_step", None)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="unknown task name 'nope'"):
        make_task("nope")
    with pytest.raises(TypeError, match="Task subclass"):
        register_task("x")(int)
    task = make_task("pointer", T=4)
    with pytest.raises(ValueError, match="batch_size"):
        task.sample(0, train_generator(0))
    with pytest.raises(TypeError, match="generator"):
        task.sample(2, 0)
    with pytest.raises(ValueError, match="split"):
        from expressive_attention.tasks import SplitGenerator
        SplitGenerator(0, "test")
    with pytest.raises(ValueError, match="unknown ladder"):
        ladder("nope")


def test_presets_take_their_rungs_from_the_task_ladders():
    from expressive_attention.experiments import PRESETS
    from expressive_attention.tasks.ladders import ladder_rungs

    for size in ("quick", "paper"):
        rungs = ladder_rungs(size)
        assert {f: fam.rungs for f, fam in PRESETS[size].families.items()} == rungs
    assert {f: LADDERS[f] for f in PRESETS["quick"].families} == ladder_rungs("quick")
