"""``biased_sigmoid``: the kernel (through the interpreter on the CPU) against PyTorch's add and
sigmoid, on rows at a stride, and its autograd, on the CPU and on the GPU."""

import pytest
import torch

from fla_factmem.modules import biased_sigmoid
from fla_factmem.modules.activations import BiasedSigmoidFunction, biased_sigmoid_fwd
from tests.utils import assert_close

# bf16: the interpreter truncates float32 to bfloat16 where the GPU rounds to nearest
TOLERANCES = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def rows_at_a_stride(B, T, C, dtype, device, layout):
    """x [B, T, C]: contiguous; a slice of a wider projection's output (rows 40 elements apart);
    or every other element of a wider one (no unit stride: the kernel gets a copy)."""
    if layout == "contiguous":
        return torch.randn(B, T, C, device=device).to(dtype)
    if layout == "slice":
        return torch.randn(B, T, 40, device=device).to(dtype)[..., 40 - C :]
    return torch.randn(B, T, 2 * C, device=device).to(dtype)[..., ::2]


def reference(x, bias):
    return torch.sigmoid(x + bias.to(x.dtype))


def float32_gradients(x, bias, dy):
    """The gradients on x and bias of the reference computed in float32 from the same rounded
    inputs: a 16-bit reference sums the bias's gradient with errors as large as the tolerance."""
    x32 = x.detach().float().requires_grad_()
    bias32 = bias.detach().to(x.dtype).float().requires_grad_()
    return torch.autograd.grad(torch.sigmoid(x32 + bias32), (x32, bias32), dy.float())


# (3, 300, 8): 900 rows, two programs of 512
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("B", "T", "C", "layout"),
    [(2, 5, 8, "contiguous"), (3, 1, 6, "slice"), (1, 300, 1, "slice"), (3, 300, 8, "every_other"), (2, 0, 8, "slice")],
)
def test_biased_sigmoid_kernel(B, T, C, layout, dtype):
    x = rows_at_a_stride(B, T, C, dtype, "cpu", layout)
    bias = torch.randn(2 * C)[::2]  # a strided bias too
    y = biased_sigmoid_fwd(x, bias)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    # against float32 from the same rounded inputs: a bf16 reference rounds once more, and with
    # the interpreter's truncation the two differ by up to 1.2e-2 (1.06e-2 seen over 300 rows)
    assert_close("y", y, reference(x.float(), bias.to(dtype).float()), TOLERANCES[dtype])


# not bfloat16 here: the interpreter's truncated y puts dx up to 1.1e-2 off (rounded, on the GPU, it is tested)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_biased_sigmoid_gradients(dtype):
    x = rows_at_a_stride(3, 7, 6, dtype, "cpu", "slice").requires_grad_()
    bias = torch.randn(6, requires_grad=True)
    dy = torch.rand(3, 7, 6).to(dtype)  # positive: the bias's gradient sums it over rows, without cancelling
    dx, dbias = torch.autograd.grad(BiasedSigmoidFunction.apply(x, bias), (x, bias), dy)
    dx_ref, dbias_ref = float32_gradients(x, bias, dy)
    assert_close("dx", dx, dx_ref, TOLERANCES[dtype])
    assert_close("dbias", dbias, dbias_ref, TOLERANCES[dtype])


def test_biased_sigmoid_takes_pytorchs_ops_on_cpu_and_checks_shapes():
    x, bias = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(8)
    assert torch.equal(biased_sigmoid(x, bias), reference(x, bias))
    for bad in (torch.randn(7), torch.randn(()), torch.randn(1, 8)):
        with pytest.raises(ValueError, match="bias of shape"):
            biased_sigmoid(x, bad)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("B", "T", "C", "layout"), [(32, 1, 8, "slice"), (4, 2049, 16, "contiguous"), (2, 7, 6, "every_other")]
)
def test_cuda_biased_sigmoid_and_gradients(B, T, C, layout, dtype):
    x = rows_at_a_stride(B, T, C, dtype, "cuda", layout).requires_grad_()
    bias = torch.randn(C, device="cuda", requires_grad=True)
    y = biased_sigmoid(x, bias)
    y_ref = reference(x, bias)
    # rounded as PyTorch rounds: within a unit in the last place of 16-bit outputs (up to 2 in
    # [0.5, 1)); float32 keeps the few units of Triton's approximate exp
    ulps = 4 if dtype == torch.float32 else 1
    assert (y.float() - y_ref.float()).abs().max() <= ulps * torch.finfo(dtype).eps
    dy = torch.rand_like(y)
    dx, dbias = torch.autograd.grad(y, (x, bias), dy)
    dx_ref, dbias_ref = float32_gradients(x, bias, dy)
    assert_close("dx", dx, dx_ref, TOLERANCES[dtype])
    assert_close("dbias", dbias, dbias_ref, TOLERANCES[dtype])


@pytest.mark.cuda
def test_cuda_biased_sigmoid_keeps_float64():
    x, bias = torch.randn(4, 8, device="cuda", dtype=torch.float64), torch.randn(8, device="cuda")
    assert torch.equal(biased_sigmoid(x, bias), reference(x, bias))
