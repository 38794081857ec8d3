"""The blocked backend's two paths: tile functions compiled by torch.compile, and the plain PyTorch
path (the one test_backends_conformance.py runs, tiny calls never being compiled). The compiled path
is checked against the reference here, values and gradients, on a few shapes (each new kind of call
is a compile of tens of seconds); plus the switch (EA_COMPILE), the size rule, torch.func, and the
fallback when compiling fails."""
import warnings

import pytest
import torch
from attention_inputs import assert_matches, make_qkv, mask_kwargs

from expressive_attention import expressive_attention
from expressive_attention.ops import blocked, tile_compile

needs_compiler = pytest.mark.skipif(tile_compile.unavailable_reason(torch.device("cpu")) is not None,
                                    reason="torch.compile cannot build CPU code here (no C++ compiler)")


@pytest.fixture
def fresh_state(monkeypatch):
    """An empty compile cache and no earlier failure, as in a new process (restored afterwards)."""
    monkeypatch.setattr(tile_compile, "_COMPILED", {})
    monkeypatch.setattr(tile_compile, "_STATE", {"failed": None, "announced": False})
    monkeypatch.setattr(tile_compile, "compile_seconds", {})


def _check_compiled(q, k, v, **kw):
    """backend="blocked" under EA_COMPILE=1 matches the reference and did run compiled tiles."""
    kw = dict(kw, enable_gqa=q.shape[1] != k.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a compile failure would warn and fall back
        out = expressive_attention(q, k, v, backend="blocked", **kw)
        ref = expressive_attention(q, k, v, backend="reference", **kw)
        assert_matches(out, ref, (q, k, v), atol=1e-10, rtol=1e-8)
    assert tile_compile._STATE["failed"] is None
    assert {"_forward_tile", "_backward_tile"} <= set(tile_compile.compile_seconds)


@needs_compiler
@pytest.mark.slow
def test_compiled_tiles_match_reference_saturating(monkeypatch):
    monkeypatch.setenv("EA_COMPILE", "1")
    monkeypatch.setattr(blocked, "TILE_ELEMENTS", 2048)  # several row blocks: first, middle, last, L > S
    # GQA (3 query heads per key head), causal, odd sizes; L < S and L > S reuse the same graphs
    for L, S in ((130, 130), (61, 130), (130, 45)):
        q, k, v = make_qkv(2, 6, 2, L, S, 24, 12)
        _check_compiled(q, k, v, is_causal=True)
    # a per-head boolean mask with a fully masked row, and a key-padding mask
    q, k, v = make_qkv(2, 4, 4, 77, 45, 8, 8)
    _check_compiled(q, k, v, **mask_kwargs("bool", 2, 4, 77, 45))
    _check_compiled(q, k, v, **mask_kwargs("keypad", 2, 4, 77, 45))


@needs_compiler
@pytest.mark.slow
def test_compiled_tiles_match_reference_squared(monkeypatch):
    monkeypatch.setenv("EA_COMPILE", "1")
    monkeypatch.setattr(blocked, "TILE_ELEMENTS", 2048)
    q, k, v = make_qkv(1, 3, 1, 100, 100, 16, 16)
    _check_compiled(q, k, v, is_causal=True, variant="squared")


def test_ea_compile_0_selects_the_plain_path(monkeypatch, fresh_state):
    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile must not be called with EA_COMPILE=0")

    monkeypatch.setattr(torch, "compile", no_compile)
    monkeypatch.setenv("EA_COMPILE", "0")
    assert not tile_compile.use_compiled(2**30, torch.zeros(1))
    q, k, v = make_qkv(1, 2, 2, 40, 40, 8, 8)
    out = expressive_attention(q, k, v, is_causal=True, backend="blocked")
    torch.testing.assert_close(out, expressive_attention(q, k, v, is_causal=True, backend="reference"))
    assert tile_compile._COMPILED == {}


def test_auto_compiles_only_big_calls(monkeypatch):
    monkeypatch.delenv("EA_COMPILE", raising=False)
    x = torch.zeros(1)
    assert not tile_compile.use_compiled(tile_compile.COMPILE_MIN_SCORES - 1, x)
    big = tile_compile.use_compiled(tile_compile.COMPILE_MIN_SCORES, x)
    assert big == (tile_compile.unavailable_reason(x.device) is None)
    monkeypatch.setenv("EA_COMPILE", "1")
    assert tile_compile.use_compiled(1, x) == big


def test_bad_ea_compile_value_is_named(monkeypatch):
    monkeypatch.setenv("EA_COMPILE", "yes")
    q, k, v = make_qkv(1, 1, 1, 8, 8, 4, 4)
    with pytest.raises(ValueError, match="EA_COMPILE"):
        expressive_attention(q, k, v, backend="blocked")


def test_devices_without_inductor_and_windows_run_plain(monkeypatch, fresh_state):
    assert "mps" in tile_compile.unavailable_reason(torch.device("mps"))
    monkeypatch.setattr(tile_compile.sys, "platform", "win32")
    assert "Windows" in tile_compile.unavailable_reason(torch.device("cpu"))
    monkeypatch.setattr(tile_compile.sys, "platform", "linux")
    monkeypatch.setattr(tile_compile.shutil, "which", lambda name: None)
    assert "C++ compiler" in tile_compile.unavailable_reason(torch.device("cpu"))


def test_compile_failure_warns_once_and_falls_back(monkeypatch, fresh_state):
    calls = []

    def broken_compile(fn, **kwargs):
        calls.append(fn.__name__)
        raise RuntimeError("inductor exploded\nsecond line")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(tile_compile, "_has_cxx", lambda: True)  # torch.compile is fake: no compiler needed
    monkeypatch.setenv("EA_COMPILE", "1")
    q, k, v = make_qkv(2, 4, 2, 50, 50, 8, 8)
    with pytest.warns(RuntimeWarning, match="inductor exploded.*plain PyTorch path"):
        out = expressive_attention(q, k, v, is_causal=True, enable_gqa=True, backend="blocked")
    ref = expressive_attention(q, k, v, is_causal=True, enable_gqa=True, backend="reference")
    assert_matches(out, ref, (q, k, v), atol=1e-10, rtol=1e-8)
    assert calls == ["_forward_tile"]  # one attempt, then the plain path for good (the backward too)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expressive_attention(q, k, v, is_causal=True, enable_gqa=True, backend="blocked")
    assert "exploded" in tile_compile.unavailable_reason(torch.device("cpu"))


def test_torch_func_never_compiles(monkeypatch, fresh_state):
    from torch.func import grad, vmap

    def no_compile(*args, **kwargs):
        raise AssertionError("the compiled path must not run under torch.func")

    monkeypatch.setattr(torch, "compile", no_compile)
    monkeypatch.setenv("EA_COMPILE", "1")
    q, k, v = make_qkv(3, 2, 2, 30, 30, 8, 8, requires_grad=False)

    def loss(q, k, v):
        return expressive_attention(q, k, v, is_causal=True, backend="blocked").square().sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = vmap(grad(loss))(q, k, v)
    leaves = [t[0].clone().requires_grad_() for t in (q, k, v)]
    monkeypatch.setenv("EA_COMPILE", "0")
    torch.testing.assert_close(g[0], torch.autograd.grad(loss(*leaves), leaves[0])[0])
