"""The float32 linear form's cancellation (issue #24, defect 1): s^2 = <phi(q), phi(k)> sums terms of size
|q|^2 |k|^2, so for large, nearly orthogonal q and k float32 loses s^2. The backend bounds the error by
u * R_i (ops/linear.py, FP64_RETRY_ABOVE; docs/linear.md "Accuracy") and recomputes such calls in
float64. Each test also runs with the retry turned off, to show that it needs it."""
import math

import pytest
import torch

from expressive_attention import expressive_attention
from expressive_attention.ops import choose_backend, linear
from expressive_attention.ops.problem import normalise

U32 = torch.finfo(torch.float32).eps / 2


def near_orthogonal(L, S, E, cos, seed=0, norm=30.0):
    """q along one direction d, keys at cosine +-cos to d (norms ~norm): s is ~cos |q||k|, R ~ 1/cos^2."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(E, generator=g, dtype=torch.float64)
    d = d / d.norm()
    q = norm * (1 + torch.rand(L, 1, generator=g, dtype=torch.float64)) * d
    w = torch.randn(S, E, generator=g, dtype=torch.float64)
    w = w - (w @ d)[:, None] * d
    w = w / w.norm(dim=-1, keepdim=True)
    sign = torch.where(torch.rand(S, 1, generator=g) > 0.5, 1.0, -1.0).double()
    k = norm * (sign * cos * d + math.sqrt(1 - cos * cos) * w)
    v = torch.randn(S, 3, generator=g, dtype=torch.float64)
    return q[None, None].float(), k[None, None].float(), v[None, None].float()


def errors(q, k, v, **kw):
    """max |linear fp32 - exact| / max|v| for the output and each gradient (exact: float64 reference)."""
    do = torch.randn(*q.shape[:-1], v.shape[-1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = []
    for dtype, backend in ((torch.float64, "reference"), (torch.float32, "linear")):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = expressive_attention(*leaves, variant="squared", backend=backend, **kw)
        res.append([out, *torch.autograd.grad(out, leaves, do.to(dtype))])
    return [((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for b, a in zip(*res)]


def test_issue_example_is_right():
    q = torch.tensor([[[[30.0, 30.0]]]])
    k = torch.tensor([[[[30.0, -29.999]]]])
    v = torch.ones(1, 1, 1, 1)
    want = expressive_attention(q.double(), k.double(), v.double(), variant="squared", backend="reference")
    got = expressive_attention(q, k, v, variant="squared", backend="linear")
    assert abs(got.item() - want.item()) < 1e-5, (got.item(), want.item())  # was 0.03125 vs 0.99778


@pytest.mark.parametrize("causal", [False, True])
def test_near_orthogonal_rows_within_the_bound(causal, monkeypatch):
    L = S = 200  # causal: rows past the first chunk read the state
    q, k, v = near_orthogonal(L, S, 8, cos=1e-3)
    kw = {"is_causal": causal}
    out_err, *grad_errs = errors(q, k, v, **kw)
    assert out_err < 2 * U32 * linear.FP64_RETRY_ABOVE, out_err
    assert max(grad_errs) < 1e-3, grad_errs
    monkeypatch.setattr(linear, "FP64_RETRY_ABOVE", math.inf)  # the plain float32 form is far off
    assert errors(q, k, v, **kw)[0] > 1e-4


def test_well_conditioned_calls_stay_in_float32(monkeypatch):
    # random inputs have R ~ E: no float64 retry (it would cost the linear form its speed)
    calls = []
    real = linear.needs_float64
    monkeypatch.setattr(linear, "needs_float64", lambda *a: calls.append(real(*a)) or calls[-1])
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 300, 16, generator=g, requires_grad=True) for _ in range(3))
    expressive_attention(q, k, v, is_causal=True, variant="squared", backend="linear").sum().backward()
    assert calls == [False, False]  # forward and backward checked, neither retried


def test_ratio_matches_its_definition():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, 7, 3, generator=g, dtype=torch.float64), torch.randn(1, 5, 3, generator=g, dtype=torch.float64)
    s = 0.5 * q[0, 0] @ k[0].T
    z = (1e-6 + s.square().sum(-1))[None, None, :, None]
    want = 0.25 * q[0, 0].square().sum(-1) * k[0].square().sum() / z[0, 0, :, 0]
    torch.testing.assert_close(linear.cancellation_ratio(q, k, z, False, 0.5, 64)[0, 0], want)
    assert (want >= 1).all()  # Cauchy-Schwarz: |s| <= scale |q| |k|


def test_auto_picks_linear_and_gets_it_right():
    q, k, v = near_orthogonal(512, 512, 2, cos=3e-4, seed=3)
    p = normalise(q, k, v, None, 0.0, True, None, False, "squared", 1e-6)
    assert choose_backend(p).name == "linear"
    got = expressive_attention(q, k, v, is_causal=True, variant="squared")
    want = expressive_attention(q.double(), k.double(), v.double(), is_causal=True, variant="squared", backend="reference")
    assert (got.double() - want).abs().max() < 1e-4 * v.abs().max()


@pytest.mark.parametrize("dtype,cos", [(torch.float64, 1e-5), (torch.float32, 1e-7)])
def test_beyond_float64_runs_the_quadratic_form(dtype, cos, monkeypatch):
    # float64 inputs with R above the bound (found by the fuzzer: 1e-10 off at R = 1e10), and float32 ones
    # beyond what the float64 retry covers, run on the blocked backend
    from expressive_attention.ops import blocked

    q, k, v = (t.to(dtype) for t in near_orthogonal(3, 5, 4, cos=cos, seed=4))
    ran = []
    real = blocked.BACKEND.run
    monkeypatch.setattr(blocked, "BACKEND", blocked.BACKEND.__class__(
        **{**blocked.BACKEND.__dict__, "run": lambda p: ran.append(1) or real(p)}))
    got = expressive_attention(q, k, v, variant="squared", backend="linear")
    want = expressive_attention(q.double(), k.double(), v.double(), variant="squared", backend="reference")
    assert ran == [1]
    ref = expressive_attention(q, k, v, variant="squared", backend="reference")  # (float32: off by u sqrt(R) too)
    assert (got.double() - want).abs().max() <= 4 * (ref.double() - want).abs().max() + 1e-12 * want.abs().max()
