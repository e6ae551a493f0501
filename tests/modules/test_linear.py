"""``split_linear``: one linear map per block of a weight's rows, against ``F.linear`` on each
block, with the backward's gradients on the input and the weight."""

import pytest
import torch
import torch.nn.functional as F

from fla_factmem.modules import split_linear
from tests.utils import assert_close

SIZES = (8, 8, 24, 4)


def per_block(x, weight, sizes):
    return tuple(F.linear(x, block) for block in weight.split(sizes))


def gradients(fn, x, weight, dys, used):
    """fn's outputs and the gradients on x and weight of sum <y_i, dy_i> over the outputs in ``used``."""
    x, weight = (t.detach().clone().requires_grad_() for t in (x, weight))
    ys = fn(x, weight, SIZES)
    torch.autograd.backward([ys[i] for i in used], [dys[i] for i in used])
    return ys, x.grad, weight.grad


def test_split_linear_gradcheck():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(sum(SIZES), 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: split_linear(x, w, SIZES), (x, weight))


@pytest.mark.parametrize("used", [(0, 1, 2, 3), (2,), (0, 3)])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_split_linear_matches_per_block(used, dtype, tol):
    """Blocks whose outputs get no gradient get a zero gradient on their rows of the weight."""
    x = torch.randn(2, 5, 16).to(dtype)
    weight = torch.randn(sum(SIZES), 16).to(dtype)
    dys = [torch.randn(2, 5, n).to(dtype) for n in SIZES]
    ours, ref = (gradients(fn, x, weight, dys, used) for fn in (split_linear, per_block))
    for i, (y, y_ref) in enumerate(zip(ours[0], ref[0])):
        assert y.is_contiguous() and y.dtype == dtype
        assert_close(f"y{i}", y, y_ref, tol)
    for name, grad, grad_ref in zip(("dx", "dweight"), ours[1:], ref[1:]):
        assert grad.dtype == dtype
        assert_close(name, grad, grad_ref, tol)


def test_split_linear_under_autocast():
    """Autocast makes the outputs and their gradients narrower than x and the weight: the
    gradients come back in x's and the weight's dtype."""
    x = torch.randn(3, 16)
    weight = torch.randn(sum(SIZES), 16)
    dys = [torch.randn(3, n).to(torch.bfloat16) for n in SIZES]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = (gradients(fn, x, weight, dys, range(4)) for fn in (split_linear, per_block))
    assert ours[0][0].dtype == torch.bfloat16
    for name, grad, grad_ref in zip(("dx", "dweight"), ours[1:], ref[1:]):
        assert grad.dtype == torch.float32
        assert_close(name, grad, grad_ref, 1e-2)


def test_split_linear_errors():
    with pytest.raises(ValueError, match="split_linear"):
        split_linear(torch.randn(2, 16), torch.randn(40, 16), SIZES)
    with pytest.raises(ValueError, match="split_linear"):
        split_linear(torch.randn(2, 8), torch.randn(sum(SIZES), 16), SIZES)
