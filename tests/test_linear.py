"""vdit_core.layers.linear: oneDNN for large float32 inference products on x86 CPUs (fused GELU),
F.linear for everything else; values as F.linear's, gradients and LoRA hooks untouched."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import profile

from vdit_core import layers
from vdit_core.layers import GELUProj, Linear, linear

onednn = pytest.mark.skipif(not layers._ONEDNN, reason="oneDNN linear is used on x86 CPUs only")


def _ops(fn) -> set[str]:
    with profile() as p:
        fn()
    return {e.key for e in p.key_averages()}


def _big(seed=0, rows=256, n=256):  # 2^24 multiply-adds: the smallest product oneDNN takes
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g), torch.randn(n, n, generator=g) / 16, torch.randn(n, generator=g)


@onednn
@pytest.mark.parametrize("gelu", [False, True])
def test_large_inference_products_go_through_onednn_with_linears_values(gelu):
    x, w, b = _big()
    want = x.double() @ w.double().T + b.double()
    if gelu:
        want = F.gelu(want, approximate="tanh")
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in _ops(lambda: linear(x, w, b, gelu=gelu))
        got = linear(x, w, b, gelu=gelu)
        blas = F.linear(x, w, b)
        blas = F.gelu(blas, approximate="tanh") if gelu else blas
    # as close to the float64 result as the BLAS path is
    err, blas_err = (got.double() - want).abs().max().item(), (blas.double() - want).abs().max().item()
    assert err < 4 * max(blas_err, 1e-6), (err, blas_err)
    # batched [B, S, in] inputs and non-contiguous ones
    x3 = torch.randn(2, 300, 512)[:, :, ::2]
    with torch.no_grad():
        assert torch.allclose(linear(x3, w, b), F.linear(x3, w, b), atol=1e-5)


def test_small_products_gradients_and_other_dtypes_take_f_linear_exactly():
    x, w, b = _big()
    with torch.no_grad():  # below the size oneDNN takes
        assert torch.equal(linear(x[:8], w, b), F.linear(x[:8], w, b))
        assert torch.equal(linear(x.double(), w.double(), b.double()), F.linear(x.double(), w.double(), b.double()))
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    assert "mkldnn::_linear_pointwise" not in _ops(lambda: linear(xg, wg, b))
    linear(xg, wg, b, gelu=True).sum().backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.gelu(F.linear(xr, wr, b), approximate="tanh").sum().backward()
    assert torch.equal(xg.grad, xr.grad) and torch.equal(wg.grad, wr.grad)


@onednn
def test_a_hooked_layer_is_not_fused_with_its_gelu():
    """A LoRA adapter adds to the projection's output through a forward hook, before the GELU."""
    x, w, b = _big()
    ff = GELUProj(256, 256)
    with torch.no_grad():
        ff.proj.weight.copy_(w)
        ff.proj.bias.copy_(b)
        fused = ff(x)
        assert torch.allclose(fused, F.gelu(F.linear(x, w, b), approximate="tanh"), atol=1e-5)
        handle = ff.proj.register_forward_hook(lambda m, inp, out: out + 1.0)
        hooked = ff(x)
        handle.remove()
    assert isinstance(ff.proj, Linear)
    assert torch.allclose(hooked, F.gelu(F.linear(x, w, b) + 1.0, approximate="tanh"), atol=1e-5)


@onednn
def test_compiled_code_keeps_the_onednn_call():
    """Inductor lowers oneDNN's linear only for frozen weights: under torch.compile the call goes
    in as an opaque op, so a compiled MLP gets the same kernel (and values) as eager."""
    from vdit_core.pipeline import check_compiler

    try:
        check_compiler("cpu")
    except ValueError as e:
        pytest.skip(str(e))
    x, w, b = _big()

    def mlp(x):
        return linear(linear(x, w, b, gelu=True), w, b) * 2.0

    compiled = torch.compile(mlp)
    with torch.no_grad():
        eager = mlp(x)
        assert "vdit::onednn_linear" in _ops(lambda: compiled(x))
        assert torch.allclose(compiled(x), eager, atol=1e-5)
