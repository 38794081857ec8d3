"""The Triton backend against the reference, run on CPU by Triton's interpreter, and its GPU
build compiled ahead of time (no GPU needed).

Triton picks interpreter or compiler as @triton.jit decorates a function (TRITON_INTERPRET),
and triton.language's own helpers (tl.zeros, tl.sum) are decorated when triton is first imported.
By the time pytest reaches this module other modules have imported triton in compiled mode, so the
kernel checks run in fresh Pythons: `TRITON_INTERPRET=1 python <this file> GROUP` (one pytest test
per group, so xdist spreads them; a failing check prints its name and traceback).
Shapes are tiny (the interpreter runs numpy per tile) but cross its 16-wide tiles.
"""
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

import triton  # noqa: F401  (a dev dependency: a missing triton must fail here, not skip)
from expressive_attention.ops import BACKENDS, expressive_attention
from expressive_attention.ops.problem import normalise
from expressive_attention.ops.triton_ea import interpreter_enabled, supports

VARIANTS = ("saturating", "squared", "exp_squared")


# ----------------------------------------------------------------------------- helpers

def _inputs(B, H, Hkv, L, S, E, Ev, dtype=torch.float32, seed=0, qk_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, L, E, generator=g) * qk_scale).to(dtype).requires_grad_()
    k = (torch.randn(B, Hkv, S, E, generator=g) * qk_scale).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, S, Ev, generator=g).to(dtype).requires_grad_()
    return q, k, v


def _run(backend, q, k, v, dout, **kw):
    out = expressive_attention(q, k, v, backend=backend, **kw)
    return out, torch.autograd.grad(out, (q, k, v), dout)


def _assert_close(got, ref, tol, what):
    """max |got - ref| <= tol * max(1, max |ref|): relative to the tensor's scale."""
    assert torch.isfinite(got).all(), f"{what}: not finite"
    err = (got.float() - ref.float()).abs().max().item()
    bound = tol * max(1.0, ref.float().abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def _check(q, k, v, tol=2e-5, **kw):
    """Triton vs reference: output and all three gradients (a random dO)."""
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(*q.shape[:-1], v.shape[-1], generator=g).to(q.dtype)
    out, grads = _run("triton", q, k, v, dout, **kw)
    ref, ref_grads = _run("reference", q, k, v, dout, **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    _assert_close(out, ref, tol, "out")
    for name, gt, gr in zip("qkv", grads, ref_grads):
        assert gt.dtype == gr.dtype and gt.shape == gr.shape
        _assert_close(gt, gr, 5 * tol, f"d{name}")
    return out, grads


def _problem(**kw):
    args = dict(query=torch.randn(1, 2, 70, 16), key=torch.randn(1, 2, 70, 16),
                value=torch.randn(1, 2, 70, 16), attn_mask=None, dropout_p=0.0, is_causal=False,
                scale=None, enable_gqa=False, variant="saturating", eps=1e-6)
    args.update(kw)
    return normalise(**args)


# ----------------------------------------------------------------------------- interpreter checks
# Each check runs in the child process; GROUPS maps a pytest test to its checks.

def check_shapes_and_causal():
    # E, Ev not powers of two (padded to 32 / 16); L != S both ways under causal; L = 1.
    cases = [(2, 1, 7, 33, False), (1, 2, 33, 20, True), (1, 1, 20, 33, True), (2, 1, 1, 7, False),
             (1, 1, 1, 1, True)]
    for variant in VARIANTS:
        for B, H, L, S, causal in cases:
            q, k, v = _inputs(B, H, H, L, S, 20, 12, seed=L * 100 + S)
            _check(q, k, v, is_causal=causal, variant=variant)


def check_gqa():
    # H=4 query heads on Hkv=2 with a (1, H, L, S) mask: head h must read mask head h.
    for variant in VARIANTS:
        q, k, v = _inputs(1, 4, 2, 17, 17, 16, 16, seed=3)
        mask = torch.rand(1, 4, 17, 17, generator=torch.Generator().manual_seed(4)) > 0.4
        _check(q, k, v, attn_mask=mask, enable_gqa=True, variant=variant)
    q, k, v = _inputs(1, 3, 1, 17, 17, 16, 8, seed=5)  # one key/value head, causal
    _check(q, k, v, is_causal=True, enable_gqa=True)


def check_masks_and_empty_rows():
    # (B, 1, L, S) mask broadcast over heads; rows 0 (all b) and 9 (b = 1) see no key at all.
    B, H, L, S = 2, 2, 17, 19
    mask = torch.rand(B, 1, L, S, generator=torch.Generator().manual_seed(6)) > 0.5
    mask[:, :, 0] = False
    mask[1, :, 9] = False
    for variant, eps in (("saturating", 0.0), ("squared", 1e-6), ("exp_squared", 0.0), ("exp_squared", 1e-6)):
        q, k, v = _inputs(B, H, H, L, S, 16, 16, seed=7)
        out, grads = _check(q, k, v, attn_mask=mask, variant=variant, eps=eps)
        assert (out[:, :, 0] == 0).all() and (out[1, :, 9] == 0).all(), "empty row not zero"
        assert (grads[0][:, :, 0] == 0).all(), "empty row has a query gradient"
    # (B, 1, 1, S) key-padding mask: the Hm = 1 and Lm = 1 broadcast paths.
    q, k, v = _inputs(2, 2, 2, 9, 21, 16, 16, seed=8)
    mask = torch.ones(2, 1, 1, 21, dtype=torch.bool)
    mask[0, ..., 15:] = False
    mask[1, ..., :3] = False
    for variant in ("squared", "exp_squared"):
        _check(q, k, v, attn_mask=mask, variant=variant)


def check_half_precision_large_scores():
    # |s| in the hundreds: s^2 passes fp16's 65504; nothing may overflow (squared in fp16 too).
    for dtype in (torch.bfloat16, torch.float16):
        for variant in VARIANTS:
            q, k, v = _inputs(1, 1, 1, 17, 18, 16, 16, dtype=dtype, seed=9, qk_scale=12.0)
            s = (q.float() @ k.float().transpose(-1, -2)) / 4
            assert s.abs().max() > 300
            _check(q, k, v, tol=3e-2, is_causal=True, variant=variant)


def check_strides_3d_and_expanded_grad():
    # (B, L, H, E) storage seen as (B, H, L, E), a strided value, a custom scale; out.sum()'s
    # expanded (all-zero-stride) dO; 3-D inputs without a batch dim.
    g = torch.Generator().manual_seed(10)
    q = torch.randn(2, 19, 2, 16, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 21, 2, 16, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 21, 2, 32, generator=g)[..., ::2].transpose(1, 2).requires_grad_()
    _check(q, k, v, scale=0.7)
    got = torch.autograd.grad(expressive_attention(q, k, v, backend="triton").sum(), (q, k, v))
    ref = torch.autograd.grad(expressive_attention(q, k, v, backend="reference").sum(), (q, k, v))
    for name, a, b in zip("qkv", got, ref):
        _assert_close(a, b, 1e-4, f"d{name} of out.sum()")
    q3, k3, v3 = (t.detach()[0].clone().requires_grad_() for t in (q, k, v))
    _check(q3, k3, v3, is_causal=True, variant="squared")


def check_decode():
    # L <= 16 rows (decode, split-K): S = 1, S < L, S crossing several 16-key blocks and splits;
    # GQA (the G x L rows of a key head in one tile), masks with empty rows, causal, cache views.
    cases = [(1, 2, 2, 1, 1), (2, 4, 1, 3, 5), (1, 6, 2, 1, 70), (2, 2, 1, 16, 40), (1, 4, 4, 7, 33)]
    for variant in VARIANTS:
        for B, H, Hkv, L, S in cases:
            q, k, v = _inputs(B, H, Hkv, L, S, 16, 12, seed=L * 100 + S)
            _check(q, k, v, enable_gqa=True, variant=variant)
            _check(q, k, v, enable_gqa=True, is_causal=True, variant=variant)
            mask = torch.rand(B, H, L, S, generator=torch.Generator().manual_seed(S)) > 0.4
            mask[0, 0, 0] = False  # a row that sees nothing
            out, _ = _check(q, k, v, attn_mask=mask, enable_gqa=True, variant=variant, eps=0.0)
            assert (out[0, 0, 0] == 0).all(), "empty row not zero"
            pad = torch.ones(B, 1, 1, S, dtype=torch.bool)
            pad[0, ..., S // 2:] = False
            _check(q, k, v, attn_mask=pad, enable_gqa=True, variant=variant)
    # k/v as a KV cache holds them (the first S rows of a longer buffer); bf16
    buf = torch.randn(2, 1, 2, 64, 16)
    k, v = (t[:, :, :45].requires_grad_() for t in buf)
    q = torch.randn(1, 4, 1, 16, requires_grad=True)
    _check(q, k, v, enable_gqa=True)
    _check(*(t.detach().bfloat16().requires_grad_() for t in (q, k, v)), tol=3e-2, enable_gqa=True)


def check_decode_split_counts():
    # forced split counts, more splits than key blocks (empty splits) included, against the reference
    from expressive_attention.ops import triton_ea as te

    q, k, v = (t.detach() for t in _inputs(2, 4, 2, 2, 50, 16, 16, seed=12))
    for splits in (1, 2, 3, 9):
        for causal in (False, True):
            out, z = te._forward_decode(q, k, v, None, causal, 0.25, "saturating", 1e-6, splits=splits)
            ref = expressive_attention(q, k, v, is_causal=causal, scale=0.25, enable_gqa=True,
                                       backend="reference")
            _assert_close(out, ref, 2e-5, f"splits={splits} causal={causal}")
            assert z.shape == (2 * 4, 2) and (z > 0).all()
    # exp_squared: key norms ramping up (or down) along S put the row maximum in the last (first) split,
    # s^2 up to ~1e3 (exp(s^2) overflows even float64): the combine rescales the splits; z holds lse
    ramp = torch.linspace(0.2, 8.0, 50)[:, None]
    for keys in (k * ramp, k * ramp.flip(0)):
        s2 = (q @ keys.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.25).square()
        for splits in (1, 3, 9):
            out, z = te._forward_decode(q, keys, v, None, False, 0.25, "exp_squared", 1e-6, splits=splits)
            ref = expressive_attention(q, keys, v, scale=0.25, enable_gqa=True, variant="exp_squared",
                                       backend="reference")
            _assert_close(out, ref, 2e-5, f"exp_squared splits={splits}")
            lse = torch.logaddexp(s2.double().logsumexp(-1), torch.tensor(1e-6, dtype=torch.float64).log())
            _assert_close(z.double(), lse.view(8, 2), 1e-6, f"exp_squared lse, splits={splits}")


def check_auto_and_supports_under_interpreter():
    # The interpreter runs CPU tensors on request, but "auto" keeps Triton for CUDA tensors.
    assert interpreter_enabled()
    p = _problem()
    assert supports(p) is None
    assert BACKENDS["triton"].supports(p) is None
    assert not BACKENDS["triton"].chosen_by_auto(p)  # supported on CPU tensors, never picked by "auto"


def check_empty_inputs():
    # Empty L, S, E, Ev, B (4-D and 3-D) through backend="triton": SDPA's shapes, zeros, zero grads.
    for shapes in (((2, 2, 0, 16), (2, 2, 5, 16)), ((2, 2, 4, 16), (2, 2, 0, 16)),
                   ((2, 2, 4, 0), (2, 2, 5, 0)), ((0, 2, 4, 16), (0, 2, 5, 16)), ((3, 0, 16), (3, 5, 16))):
        q = torch.randn(*shapes[0], requires_grad=True)
        k = torch.randn(*shapes[1], requires_grad=True)
        v = torch.randn(*shapes[1][:-1], 16, requires_grad=True)
        out = expressive_attention(q, k, v, backend="triton", is_causal=True)
        assert out.shape == (*shapes[0][:-1], 16) and (out == 0).all(), shapes
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert all(g.shape == t.shape and (g == 0).all() for g, t in zip(grads, (q, k, v))), shapes


def check_double_backward_raises():
    # The backward is not itself differentiable: say so instead of returning wrong zeros.
    q, k, v = _inputs(1, 1, 1, 5, 6, 16, 16, seed=11)
    out = expressive_attention(q, k, v, backend="triton")
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    try:
        dq.sum().backward()
    except RuntimeError as e:
        assert "once_differentiable" in str(e), e
    else:
        raise AssertionError("double backward did not raise")


def check_kernels_compile_for_sm90():
    # No GPU here, but ptxas ships with triton: compile the kernels ahead of time to an sm_90
    # cubin, so the compiled path (not only the interpreter) is known to build. bf16 with causal
    # and a mask; fp16 "squared" (its f V product runs in tf32); bf16 "exp_squared" (its online max).
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from expressive_attention.ops import triton_ea as te

    assert not interpreter_enabled()
    target = GPUTarget("cuda", 90, 32)
    for dtype, variant in ((torch.bfloat16, "saturating"), (torch.float16, "squared"),
                           (torch.bfloat16, "exp_squared")):
        dt = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        kernels = ((te._fwd, False), (te._fwd_decode, False), (te._bwd_delta, True), (te._bwd_dkdv, True),
                   (te._bwd_dq, True))
        for fn, backward in kernels:
            if dtype == torch.float16 and backward:
                continue
            cfg = te._config(64, 64, dtype, True, backward)
            consts = dict(VARIANT=variant, CAUSAL=dtype == torch.bfloat16,
                          HAS_MASK=True, PRECISION=None, DOT=te._dot_dtype(dtype), BLOCK_E=64,
                          BLOCK_EV=64, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
            if fn is te._fwd_decode:  # 2 query heads x 8 rows, as for GQA with a few new tokens
                consts.update(BLOCK_M=16, BLOCK_N=64)
            if fn in (te._fwd, te._fwd_decode):
                consts["F32_PV"] = variant == "squared" and dtype == torch.float16
            consts = {n: c for n, c in consts.items() if n in fn.arg_names}
            types = {"M": "*u8", "Z": "*fp32", "D": "*fp32", "PACC": "*fp32", "PZ": "*fp32",
                     "PM": "*fp32", "scale": "fp32", "eps": "fp32",
                     **{t: "*" + dt for t in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}}
            sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
            kernel = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target,
                                    options=dict(num_warps=cfg["num_warps"],
                                                 num_stages=cfg["num_stages"]))
            assert kernel.asm["cubin"], fn.__name__
            assert kernel.metadata.shared <= 227 * 1024, (fn.__name__, kernel.metadata.shared)


GROUPS = {  # name: (run under the interpreter?, checks); one child process each
    "shapes_gqa": (True, [check_shapes_and_causal, check_gqa,
                          check_auto_and_supports_under_interpreter,
                          check_double_backward_raises, check_empty_inputs]),
    "masks_precision_strides": (True, [check_masks_and_empty_rows,
                                       check_half_precision_large_scores,
                                       check_strides_3d_and_expanded_grad]),
    "decode": (True, [check_decode, check_decode_split_counts]),
    "compile_sm90": (False, [check_kernels_compile_for_sm90]),
}


def _main(group: str) -> int:
    """Child process: run one group's checks, print each result; exit status 1 if any failed."""
    torch.set_num_threads(1)
    failed = 0
    for check in GROUPS[group][1]:
        t0 = time.perf_counter()
        try:
            check()
            print(f"ok   {check.__name__} ({time.perf_counter() - t0:.1f}s)")
        except Exception:
            failed += 1
            print(f"FAIL {check.__name__}\n{traceback.format_exc()}")
    return int(failed > 0)


# ----------------------------------------------------------------------------- pytest

@pytest.mark.parametrize("group", sorted(GROUPS))
def test_triton_checks(group, tmp_path):
    interpret, checks = GROUPS[group]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, write nothing outside tmp_path
    src = str(Path(expressive_attention.__code__.co_filename).parents[2])  # the package under test
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, __file__, group], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{group} failed:\n{r.stdout}\n{r.stderr[-3000:]}"
    assert r.stdout.count("ok   ") == len(checks), r.stdout


def test_supports_reasons(monkeypatch):
    assert "dropout" in BACKENDS["triton"].unsupported(_problem(dropout_p=0.1))
    x = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    assert "float64" in supports(_problem(query=x, key=x, value=x))
    big = torch.randn(1, 2, 8, 512)
    assert "head dims" in supports(_problem(query=big, key=big, value=big))
    if interpreter_enabled():  # this pytest itself was started with TRITON_INTERPRET=1
        assert supports(_problem()) is None
    else:
        assert "TRITON_INTERPRET" in supports(_problem())
        with pytest.raises(ValueError, match="backend='triton' cannot run"):
            expressive_attention(*(torch.randn(1, 8, 16) for _ in range(3)), backend="triton")
    from expressive_attention.ops import triton_ea

    monkeypatch.setattr(triton_ea, "triton", None)  # as if triton were not installed
    assert "not installed" in supports(_problem())


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
