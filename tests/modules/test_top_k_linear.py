"""``top_k_linear``: each token's top K per head of ``x W^T / temperature``, made a slice of
tokens at a time, against the whole logits' top K (the memory op's rule) and their autograd."""

import pytest
import torch
import torch.nn.functional as F

from fla_factmem.modules import top_k_linear
from fla_factmem.ops.factorization_memory.routing import top_rows
from tests.utils import assert_close


def whole(x, weight, H, K, temperature):
    """The top K of the whole logits, as the layer makes them without slices."""
    logits = F.linear(x, weight).unflatten(-1, (H, -1)) / temperature
    rows = top_rows(logits.detach(), K)[1]
    return logits.gather(-1, rows), rows


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("slice_tokens", [1, 3, 7, None])
@pytest.mark.parametrize(("K", "temperature"), [(1, 1.0), (4, 0.5), (12, 1.0)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_top_k_linear_matches_whole_logits(device, slice_tokens, K, temperature, dtype, tol):
    """The same picks (ties to the lower rows: the logits take few values, each exact in bf16 too,
    so that no GEMM's order of summation decides a pick) and values, and the gradients on x and
    the weight, in slices of 1 token, of a part of the tokens, or one slice."""
    H, M, D = 3, 12, 16
    x = (torch.randint(-2, 3, (2, 7, D), device=device) / 4).to(dtype).requires_grad_()
    weight = (torch.randint(-2, 3, (H * M, D), device=device) / 4).to(dtype).requires_grad_()
    values, rows = top_k_linear(x, weight, H, K, temperature, slice_tokens)
    values_ref, rows_ref = whole(x, weight, H, K, temperature)
    assert rows.shape == (2, 7, H, K) and not rows.requires_grad
    assert torch.equal(rows, rows_ref)
    assert_close("values", values, values_ref, tol)
    dvalues = torch.randn_like(values)
    grads = torch.autograd.grad(values, (x, weight), dvalues)
    grads_ref = torch.autograd.grad(values_ref, (x, weight), dvalues)
    for name, g, ref in zip(("dx", "dweight"), grads, grads_ref):
        assert g.dtype == dtype
        assert_close(name, g, ref, tol)


def test_top_k_linear_gradcheck():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2 * 8, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: top_k_linear(x, w, 2, 3, 0.7, 2)[0], (x, weight))


def test_top_k_linear_float64_is_exact():
    """Slices sum the weight's gradient in float64 for float64 weights (a float32 sum left 4e-8)."""
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(16, 6, dtype=torch.float64, requires_grad=True)
    values, rows = top_k_linear(x, weight, 2, 3, 1.0, 4)
    values_ref, rows_ref = whole(x, weight, 2, 3, 1.0)
    assert torch.equal(rows, rows_ref)
    dvalues = torch.randn_like(values)
    grads = torch.autograd.grad(values, (x, weight), dvalues)
    grads_ref = torch.autograd.grad(values_ref, (x, weight), dvalues)
    for name, g, ref in zip(("dx", "dweight"), grads, grads_ref):
        assert_close(name, g, ref, 1e-14)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_top_k_linear_of_no_tokens(device):
    x = torch.randn(0, 16, device=device, requires_grad=True)
    values, rows = top_k_linear(x, torch.randn(10, 16, device=device), 2, 3)
    assert values.shape == rows.shape == (0, 2, 3)


def test_top_k_linear_under_autocast():
    """Values in autocast's dtype; gradients in x's and the weight's."""
    x = torch.randn(4, 16, requires_grad=True)
    weight = torch.randn(2 * 8, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, _ = top_k_linear(x, weight, 2, 3, slice_tokens=3)
    assert values.dtype == torch.bfloat16
    values.float().sum().backward()
    assert x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def test_top_k_linear_errors():
    with pytest.raises(ValueError, match="top_k_linear"):
        top_k_linear(torch.randn(2, 16), torch.randn(10, 16), 3, 1)
    with pytest.raises(ValueError, match=r"topk must be in \[1, M = 5\]"):
        top_k_linear(torch.randn(2, 16), torch.randn(10, 16), 2, 6)
    for kwargs in (dict(slice_tokens=0), dict(slice_tokens=True), dict(num_heads=0), dict(topk=2.0)):
        name = next(iter(kwargs))
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            top_k_linear(torch.randn(2, 16), torch.randn(10, 16), **(dict(num_heads=2, topk=1) | kwargs))
