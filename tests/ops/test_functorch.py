"""torch.func transforms (grad, vmap, vmap of grad) over the backends: reference, blocked and linear
support them (values and gradients equal to plain autograd / a Python loop); the fused CPU kernel and
Triton refuse with an error naming the backends that do; "auto" picks one that does."""
import pytest
import torch
from torch.func import grad, vmap

from expressive_attention import expressive_attention

CASES = [("reference", "saturating"), ("blocked", "saturating"), ("blocked", "squared"), ("linear", "squared"),
         ("auto", "saturating"), ("auto", "squared")]


def _data(n=3, B=2, H=4, Hkv=2, L=70, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(n, B, H, L, E), r(n, B, Hkv, L, E), r(n, B, Hkv, L, E)


def _mask(backend, n, B, L, seed=1):
    """A per-sample key-padding mask (the linear backend takes only those), (n, B, 1, 1, L)."""
    keep = torch.rand(n, B, 1, 1, L, generator=torch.Generator().manual_seed(seed)) > 0.2
    return keep


@pytest.mark.parametrize("backend,variant", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_vmap_and_grad_match_a_loop(backend, variant, masked):
    q, k, v = _data()
    n, B, L = q.shape[0], q.shape[1], q.shape[3]
    mask = _mask(backend, n, B, L) if masked else None
    kw = dict(variant=variant, backend=backend, enable_gqa=True)
    causal = not masked

    def f(q, k, v, m):
        return expressive_attention(q, k, v, attn_mask=m, is_causal=causal, **kw)

    # vmap over the leading dim of q, k, v and the mask, vs a loop
    got = vmap(f, in_dims=(0, 0, 0, 0 if masked else None))(q, k, v, mask)
    want = torch.stack([f(q[i], k[i], v[i], None if mask is None else mask[i]) for i in range(n)])
    torch.testing.assert_close(got, want)
    # k, v shared by every vmapped query (in_dims None)
    got = vmap(f, in_dims=(0, None, None, None))(q, k[0], v[0], None)
    want = torch.stack([f(q[i], k[0], v[0], None) for i in range(n)])
    torch.testing.assert_close(got, want)

    # grad vs autograd, and per-sample gradients (vmap of grad) vs a loop of autograd
    def loss(q, k, v, m):
        return f(q, k, v, m).square().sum()

    g = grad(loss, argnums=(0, 1, 2))(q[0], k[0], v[0], None if mask is None else mask[0])
    leaves = [t[0].clone().requires_grad_() for t in (q, k, v)]
    want_g = torch.autograd.grad(loss(*leaves, None if mask is None else mask[0]), leaves)
    for a, b in zip(g, want_g):
        torch.testing.assert_close(a, b)
    per_sample = vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(0, 0, 0, 0 if masked else None))(q, k, v, mask)
    for i in range(n):
        leaves = [t[i].clone().requires_grad_() for t in (q, k, v)]
        want_i = torch.autograd.grad(loss(*leaves, None if mask is None else mask[i]), leaves)
        for a, b in zip(per_sample, want_i):
            torch.testing.assert_close(a[i], b)


@pytest.mark.parametrize("backend", ["fused_cpu", "triton"])
def test_backends_without_transform_support_say_which_do(backend):
    q, k, v = (t[0] for t in _data())
    with pytest.raises(ValueError, match=rf"backend='{backend}' cannot run this call: .*"):
        grad(lambda q: expressive_attention(q, k, v, backend=backend, enable_gqa=True).sum())(q)
    if backend == "fused_cpu":  # the reason names the backends that support transforms
        with pytest.raises(ValueError, match=r"torch.func.*\['blocked', 'linear', 'reference'\]"):
            vmap(lambda q: expressive_attention(q, k, v, backend=backend, enable_gqa=True))(q[None])


def test_auto_under_transforms_picks_a_backend_that_supports_them():
    q, k, v = (t[0] for t in _data(L=200, E=32))  # big enough that plain "auto" would use fused_cpu
    g = grad(lambda q: expressive_attention(q, k, v, is_causal=True, enable_gqa=True).sum())(q)
    leaf = q.clone().requires_grad_()
    want = torch.autograd.grad(expressive_attention(leaf, k, v, is_causal=True, enable_gqa=True,
                                                    backend="reference").sum(), leaf)[0]
    torch.testing.assert_close(g, want)


@pytest.mark.parametrize("backend,variant", [("blocked", "saturating"), ("linear", "squared")])
def test_double_backward_is_a_clear_error(backend, variant):
    # before: an in-place-modification error (blocked) or "does not require grad" (linear)
    q, k, v = (t[0].clone().requires_grad_() for t in _data(L=20))
    out = expressive_attention(q, k, v, backend=backend, variant=variant, is_causal=True, enable_gqa=True)
    (g,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=f"{backend} backend's backward is not differentiable"):
        g.sum().backward()


def test_under_functorch_and_plain_eager_see_transforms_and_modes():
    """The two checks the backends' fast paths rest on: a tensor wrapped by a transform (and only
    such a tensor) counts as transformed; fake tensors, subclasses and dispatch modes are not plain."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from expressive_attention.ops._functorch import plain_eager, under_functorch

    x, outside = torch.randn(3, 2), torch.randn(2)
    assert not under_functorch(x, outside, None) and plain_eager(x, outside)
    seen = []
    vmap(lambda row: seen.append((under_functorch(row), under_functorch(outside), under_functorch(outside, row)))
         or row)(x)
    grad(lambda t: seen.append((under_functorch(t), under_functorch(outside), under_functorch(None, t)))
         or t.sum())(outside)
    assert seen == [(True, False, True)] * 2

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert not plain_eager(x)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert not plain_eager(fake)
    assert not plain_eager(torch.nn.Parameter(x)) and not plain_eager(x, torch.nn.Parameter(x))
    assert plain_eager(x)
