"""The decode shortcut of `backend="auto"` (`fused_cpu.decode_shortcut`, reached through
`dispatch.try_shortcut`): it takes only calls that "auto" gives the fused kernel anyway, returns
exactly what the general path returns, and leaves every other call, valid or not, to the general path
(with its errors unchanged). Every case of tests/support/call_cases.py: test_argument_checks_agree.py."""
import inspect

import pytest
import torch
from attention_inputs import make_qkv
from call_cases import call_args
from torch.utils._python_dispatch import TorchDispatchMode

from expressive_attention import expressive_attention
from expressive_attention.ops import Backend, dispatch, fused_cpu, reference_attention
from expressive_attention.ops.dispatch import try_shortcut
from expressive_attention.ops.problem import normalise

ORDER = tuple(inspect.signature(normalise).parameters)  # query ... power, as try_shortcut takes them


@pytest.fixture(scope="module", autouse=True)
def built():
    assert fused_cpu.is_available(), f"fused CPU kernel did not build: {fused_cpu.build_error()}"


def _shortcut(a):
    return try_shortcut(*(a[name] for name in ORDER))


def _general(monkeypatch, a):
    """expressive_attention(**a) with the shortcuts switched off."""
    with monkeypatch.context() as mp:
        mp.setattr(dispatch, "_SHORTCUTS", [])
        return expressive_attention(**a)


@pytest.mark.parametrize("variant", fused_cpu.KERNEL_VARIANTS)
@pytest.mark.parametrize("B,H,Hkv,L,S,E,Ev", [(1, 8, 8, 1, 600, 16, 16), (2, 4, 2, 16, 77, 32, 8),
                                               (1, 2, 1, 4, 1030, 64, 64)])
def test_decode_shapes_against_the_reference(variant, B, H, Hkv, L, S, E, Ev, monkeypatch):
    q, k, v = make_qkv(B, H, Hkv, L, S, E, Ev, dtype=torch.float32, requires_grad=False)
    mask = torch.rand(B, 1, L, S, generator=torch.Generator().manual_seed(3)) > 0.3
    for kw in ({}, {"attn_mask": mask}, {"is_causal": True}):
        a = call_args(query=q, key=k, value=v, enable_gqa=Hkv != H, variant=variant, **kw)
        out = _shortcut(a)
        assert out is not None
        assert torch.equal(out, _general(monkeypatch, a))
        g = H // Hkv
        ref = reference_attention(q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1),
                                  kw.get("attn_mask"), 0.0, kw.get("is_causal", False), None, variant=variant)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-4)


def test_other_calls_take_the_general_path():
    q, k, v = make_qkv(1, 2, 2, 17, 40, 8, 8, dtype=torch.float32, requires_grad=False)
    assert _shortcut(call_args(query=q, key=k, value=v)) is None  # more rows than a decode step
    q1 = q[:, :, :1]
    assert _shortcut(call_args(query=q1, key=k, value=v)) is not None
    assert _shortcut(call_args(query=torch.nn.Parameter(q1), key=k, value=v)) is None  # a Tensor subclass
    qg = q1.clone().requires_grad_()
    assert _shortcut(call_args(query=qg, key=k, value=v)) is None  # needs a gradient
    with torch.no_grad():
        assert _shortcut(call_args(query=qg, key=k, value=v)) is not None
    with torch.inference_mode():
        assert _shortcut(call_args(query=qg, key=k, value=v)) is not None
    assert _shortcut(call_args(query=q1, key=k, value=v, scale=2e4)) is None  # the general path checks overflow


def test_gradient_through_the_public_call_is_unchanged(monkeypatch):
    q, k, v = make_qkv(1, 4, 2, 1, 50, 16, 16, dtype=torch.float32)
    out = expressive_attention(q, k, v, enable_gqa=True)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    monkeypatch.setattr(dispatch, "_SHORTCUTS", [])
    out2 = expressive_attention(q, k, v, enable_gqa=True)
    for a, b in zip((out, *grads), (out2, *torch.autograd.grad(out2.square().sum(), (q, k, v)))):
        assert torch.equal(a, b)


def test_transforms_and_dispatch_modes_see_the_custom_op():
    q, k, v = make_qkv(2, 2, 2, 1, 30, 8, 8, dtype=torch.float32, requires_grad=False)
    seen = []
    args = (None, 0.0, False, None, False, "saturating", 1e-6, None)  # attn_mask ... power
    under_vmap = torch.func.vmap(lambda q, k, v: seen.append(try_shortcut(q, k, v, *args)) or q)
    under_vmap(q[None], k[None], v[None])
    assert seen == [None]
    ops = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops():
        out = expressive_attention(q, k, v)
    assert any("fused_cpu_fwd" in name for name in ops)
    torch.testing.assert_close(out, expressive_attention(q, k, v), atol=0, rtol=0)


def test_kernel_not_loaded_means_no_shortcut(monkeypatch):
    q, k, v = make_qkv(1, 2, 2, 1, 30, 8, 8, dtype=torch.float32, requires_grad=False)
    monkeypatch.setitem(fused_cpu._STATE, "module", None)
    assert _shortcut(call_args(query=q, key=k, value=v)) is None


def test_a_registered_backend_turns_the_shortcuts_off(monkeypatch):
    monkeypatch.setattr(dispatch, "BACKENDS", dict(dispatch.BACKENDS))  # leave the real table alone
    monkeypatch.setattr(dispatch, "_SHORTCUTS", list(dispatch._SHORTCUTS))
    q, k, v = make_qkv(1, 2, 2, 1, 30, 8, 8, dtype=torch.float32, requires_grad=False)
    calls = []

    def run(p):
        calls.append(p.q.shape)
        return reference_attention(p.q, p.k, p.v, p.mask, 0.0, p.is_causal, p.scale, variant=p.variant, eps=p.eps)

    dispatch.register_backend(Backend("everything", run, lambda p: None, priority=100))
    assert dispatch._SHORTCUTS == []
    expressive_attention(q, k, v)
    assert calls == [q.shape]  # "auto" asked the table, which the new backend now tops


def test_torch_compile_traces_the_custom_op_without_graph_breaks():
    q, k, v = make_qkv(1, 4, 2, 1, 40, 8, 8, dtype=torch.float32, requires_grad=False)

    def step(q, k, v):
        return expressive_attention(q, k, v, enable_gqa=True)  # "auto", a decode call

    with torch.no_grad():
        out = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v)
        assert torch.equal(out, step(q, k, v))


def test_decoder_lm_generate_takes_the_shortcut_at_every_step(monkeypatch):
    from expressive_attention.nn import DecoderLM, LMConfig

    taken = []

    def counting(*args):
        out = fused_cpu.decode_shortcut(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(dispatch, "_SHORTCUTS", [counting])
    torch.manual_seed(0)
    model = DecoderLM(LMConfig(vocab_size=11, context_length=32, n_kv_heads=2, pos="rope")).eval()
    prompt = torch.randint(0, 11, (2, 5))
    out = model.generate(prompt, 6)
    assert out.shape == (2, 11)
    # the prompt (5 rows: a decode-sized call too), then one call per new token, in each of the 2 layers
    assert taken and all(taken) and len(taken) >= 2 * 5
    monkeypatch.setattr(dispatch, "_SHORTCUTS", [])
    assert torch.equal(model.generate(prompt, 6), out)  # the general path generates the same tokens
