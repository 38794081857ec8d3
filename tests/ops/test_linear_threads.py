"""The linear form's heads split over threads (`linear_sweeps.over_heads`): every worker count gives the
reference's values and gradients (also on one torch thread, where the default would not split), the
split leaves torch's thread settings as they were, and it is skipped where per-thread state matters."""
import threading

import pytest
import torch
from attention_inputs import assert_matches, make_qkv
from torch.utils._python_dispatch import TorchDispatchMode

from expressive_attention.ops import linear_sweeps
from expressive_attention.ops.linear import causal_forward, linear_attention
from expressive_attention.ops.linear_features import new_state
from expressive_attention.ops.problem import normalise
from expressive_attention import expressive_attention


@pytest.fixture
def one_thread():
    """torch on one thread: the default would run unsplit, so only an explicit `workers` splits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(q, k, v, workers, attn_mask=None, is_causal=False, chunk=16):
    p = normalise(q, k, v, attn_mask, 0.0, is_causal, None, q.shape[1] != k.shape[1], "squared", 1e-6)
    return linear_attention(p, chunk=chunk, workers=workers)


def reference(q, k, v, attn_mask=None, is_causal=False):
    return expressive_attention(q, k, v, attn_mask, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1],
                                variant="squared", backend="reference")


@pytest.mark.parametrize("workers", [2, 3, 8])  # N = B * Hkv = 6: even, uneven (2/2/2 vs 3/3), more than N
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("E", [5, 48])  # 48: the packed gradient through phi
def test_split_heads_match_the_reference(one_thread, workers, causal, E):
    B, H, Hkv = 3, 4, 2
    L, S = (70, 70) if causal else (70, 45)
    q, k, v = make_qkv(B, H, Hkv, L, S, E, 3, seed=E, spread=0.5)
    keep = torch.rand(B, 1, 1, S, generator=torch.Generator().manual_seed(2)) > 0.3
    keep[1] = False  # a batch entry with every key masked: its rows are zeros
    mask = keep & torch.ones(L, S, dtype=torch.bool).tril() if causal else keep  # causal: the padded-decoder mask
    out = run(q, k, v, workers, attn_mask=mask)
    assert (out[1] == 0).all()
    assert_matches(out, reference(q, k, v, attn_mask=mask), (q, k, v), 1e-10, 1e-8)


@pytest.mark.parametrize("causal", [True, False])
def test_split_equals_unsplit_in_float32(one_thread, causal):
    """The split runs the same ops per head: float32 values and gradients agree to rounding."""
    q, k, v = make_qkv(2, 2, 2, 200, 200, 16, 16, dtype=torch.float32, seed=3)
    do = torch.randn(2, 2, 200, 16, generator=torch.Generator().manual_seed(4))
    results = []
    for workers in (1, 2):
        out = run(q, k, v, workers, is_causal=causal, chunk=64)
        results.append((out, *torch.autograd.grad(out, (q, k, v), do)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_prefill_of_the_recurrent_state_splits_heads(one_thread):
    """causal_forward (the recurrent cache's prefill) with a state that already holds keys."""
    g = torch.Generator().manual_seed(5)
    N, G, n, E, Ev = 4, 2, 50, 6, 3
    q = torch.randn(N, G, 2 * n, E, generator=g, dtype=torch.float64)
    k = torch.randn(N, 2 * n, E, generator=g, dtype=torch.float64)
    v = torch.randn(N, 2 * n, Ev, generator=g, dtype=torch.float64)
    outs, states = [], []
    for workers in (1, 2):
        state = new_state(N, E, Ev, torch.float64)
        first = causal_forward(q[:, :, :n], k[:, :n], v[:, :n], state, 1e-6, 16, 0.5, workers=workers)[0]
        second = causal_forward(q[:, :, n:], k[:, n:], v[:, n:], state, 1e-6, 16, 0.5, workers=workers)[0]
        outs.append(torch.cat([first, second], 2))
        states.append(state)
    whole = causal_forward(q, k, v, new_state(N, E, Ev, torch.float64), 1e-6, 16, 0.5, workers=1)[0]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(states[1], states[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(outs[1], whole, atol=1e-12, rtol=1e-12)


def test_workers_run_on_one_thread_each_and_restore_the_settings():
    before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        x = torch.zeros(5)
        linear_sweeps.over_heads(lambda h: seen.append((h, threading.get_ident(), torch.get_num_threads())), 5, 2, x)
        assert sorted((h.start, h.stop) for h, _, _ in seen) == [(0, 2), (2, 5)]
        assert {t for _, _, t in seen} == {1}
        assert threading.get_ident() not in {i for _, i, _ in seen}
        assert torch.get_num_threads() == 2
        fresh = []  # a thread started afterwards begins with the caller's count, not the workers' 1
        t = threading.Thread(target=lambda: fresh.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert fresh == [2]
    finally:
        torch.set_num_threads(before)


def test_worker_errors_reach_the_caller():
    def fail(h):
        if h.start > 0:
            raise RuntimeError("worker failed")

    with pytest.raises(RuntimeError, match="worker failed"):
        linear_sweeps.over_heads(fail, 4, 2, torch.zeros(1))


def test_under_inference_mode(one_thread):
    q, k, v = make_qkv(2, 2, 2, 40, 40, 4, 4, requires_grad=False)
    with torch.inference_mode():
        out = run(q, k, v, 2, is_causal=True)
    torch.testing.assert_close(out, reference(q, k, v, is_causal=True), atol=1e-10, rtol=1e-8)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_not_split_under_a_dispatch_mode(one_thread):
    """A torch_dispatch mode (FLOP counters, tracers) is per thread: the heads stay in the calling thread,
    where the mode sees every op."""
    q, k, v = make_qkv(2, 2, 2, 40, 40, 4, 4, requires_grad=False)
    seen = []
    with _CountOps() as mode:
        linear_sweeps.over_heads(lambda h: seen.append(threading.get_ident()), 4, 2, q)
        out = run(q, k, v, 2, is_causal=True)
    assert seen == [threading.get_ident()]
    assert mode.ops > 40  # the chunk loop's ops were seen (40 rows, chunk 16: 3 chunks of ~10 ops)
    torch.testing.assert_close(out, reference(q, k, v, is_causal=True), atol=1e-10, rtol=1e-8)


def test_bad_workers_raise():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 4, 4)
    with pytest.raises(ValueError, match="workers"):
        run(q, k, v, 0, is_causal=True)


def _split_in_child(conn):
    seen = []
    linear_sweeps.over_heads(lambda h: seen.append(torch.get_num_threads()), 4, 2, torch.zeros(1))
    conn.send(seen)


def test_split_works_in_a_forked_child():
    """The worker threads are kept between calls; a forked child has none of them and starts its own."""
    import multiprocessing

    linear_sweeps.over_heads(lambda h: None, 4, 2, torch.zeros(1))  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_split_in_child, args=(child,))
    proc.start()
    assert parent.poll(60), "the split hung in a forked child"
    assert parent.recv() == [1, 1]
    proc.join(60)
    assert proc.exitcode == 0


@pytest.mark.parametrize("E,by_rows", [(16, False), (47, False), (48, True), (64, True)])
def test_phi_builder_in_split_workers(one_thread, E, by_rows):
    """In a worker phi is built by rows only from SPLIT_ROWS_FROM_E; elsewhere PackedFeatures decides."""
    assert linear_sweeps._phi_builder(E).by_rows is None  # the calling thread
    seen = []
    linear_sweeps.over_heads(lambda h: seen.append(linear_sweeps._phi_builder(E).by_rows), 4, 2, torch.zeros(1))
    assert seen == [by_rows, by_rows]
    assert linear_sweeps._phi_builder(E).by_rows is None


def test_small_calls_are_not_split(monkeypatch):
    """By default the heads are split only when each has enough state work to pay for the split."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert linear_sweeps.head_workers(8) == 2
        assert linear_sweeps.head_workers(8, linear_sweeps.SPLIT_MIN_WORK) == 2
        assert linear_sweeps.head_workers(8, linear_sweeps.SPLIT_MIN_WORK - 1) == 1
        assert linear_sweeps.head_workers(1, 10**12) == 1  # never more workers than heads
        calls = []
        real = linear_sweeps.over_heads
        monkeypatch.setattr(linear_sweeps, "over_heads", lambda run_, N, workers, *t: calls.append(workers) or real(run_, N, workers, *t))
        q, k, v = make_qkv(2, 2, 2, 40, 40, 4, 4, requires_grad=False)
        p = normalise(q, k, v, None, 0.0, True, None, False, "squared", 1e-6)
        linear_attention(p)  # (2 * 40 rows) * 10 features * 4 values per head: far below the threshold
        monkeypatch.setattr(linear_sweeps, "SPLIT_MIN_WORK", 0)
        linear_attention(p)
        assert calls == [1, 2]
        state = new_state(4, 4, 4, torch.float64)
        causal_forward(q.reshape(4, 1, 40, 4), k.reshape(4, 40, 4), v.reshape(4, 40, 4), state, 1e-6, 16, 0.5)
        assert calls[-1] == 2  # the recurrent cache's prefill takes the same rule
    finally:
        torch.set_num_threads(before)
