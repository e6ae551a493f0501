"""``biased_sigmoid``: the kernel (through the interpreter on the CPU) against PyTorch's add and
sigmoid, on rows at a stride, and its autograd on the GPU."""

import pytest
import torch

from fla_factmem.modules import biased_sigmoid
from fla_factmem.modules.activations import biased_sigmoid_fwd
from tests.utils import assert_close

TOLERANCES = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def strided_rows(B, T, C, dtype, device, width=None):
    """x [B, T, C] as a slice of a wider projection's output (rows ``width`` apart), or contiguous."""
    if width is None:
        return torch.randn(B, T, C, device=device).to(dtype)
    return torch.randn(B, T, width, device=device).to(dtype)[..., width - C :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("B", "T", "C", "width"), [(2, 5, 8, None), (3, 1, 6, 40), (1, 300, 1, 9), (2, 0, 8, 16)])
def test_biased_sigmoid_kernel(B, T, C, width, dtype):
    x = strided_rows(B, T, C, dtype, "cpu", width)
    bias = torch.randn(C)
    y = biased_sigmoid_fwd(x, bias)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_close("y", y, torch.sigmoid(x + bias.to(dtype)), TOLERANCES[dtype])


def test_biased_sigmoid_on_cpu_is_pytorchs():
    x, bias = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(8)
    assert torch.equal(biased_sigmoid(x, bias), torch.sigmoid(x + bias.to(x.dtype)))
    with pytest.raises(ValueError, match="bias of shape"):
        biased_sigmoid(x, torch.randn(7))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("B", "T", "C", "width"), [(32, 1, 8, 6152), (4, 2049, 16, None), (2, 7, 6, 40)])
def test_cuda_biased_sigmoid_and_gradients(B, T, C, width, dtype):
    x = strided_rows(B, T, C, dtype, "cuda", width).requires_grad_()
    bias = torch.randn(C, device="cuda", requires_grad=True)
    y = biased_sigmoid(x, bias)
    x_ref, bias_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    y_ref = torch.sigmoid(x_ref + bias_ref.to(dtype))
    assert_close("y", y, y_ref, TOLERANCES[dtype])
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    assert_close("dx", x.grad, x_ref.grad, TOLERANCES[dtype])
    assert_close("dbias", bias.grad, bias_ref.grad, TOLERANCES[dtype])
