"""``rms_norm_gated_fwd``, the gated norm's inference kernel: through the interpreter on the CPU
against the module's PyTorch math, on gates at a stride; on the GPU against FLA's kernel, and
the module's choice between the two."""

import pytest
import torch
from fla.modules.norm.fused_norm_gate import rms_norm_gated

from fla_factmem.modules import FusedRMSNormGated
from fla_factmem.modules.norm import rms_norm_gated_fwd
from tests.utils import assert_close

# bf16: the interpreter truncates float32 to bfloat16 where the GPU rounds to nearest
TOLERANCES = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def norm_inputs(B, T, D, dtype, device, layout):
    """x [B, T, D] contiguous; g [B, T, D] contiguous, or the slice of a wider projection's output
    (the layer's gate when decoding), or every other element of one (copied for the kernel)."""
    x = torch.randn(B, T, D, device=device).to(dtype)
    if layout == "contiguous":
        g = torch.randn(B, T, D, device=device)
    elif layout == "slice":
        g = torch.randn(B, T, 3 * D + 5, device=device)[..., D : 2 * D]
    else:
        g = torch.randn(B, T, 2 * D, device=device)[..., ::2]
    return x, (4 * g).to(dtype)


def make_norm(D, activation, affine, device):
    norm = FusedRMSNormGated(D, elementwise_affine=affine, eps=1e-5, activation=activation).to(device)
    if affine:
        torch.nn.init.normal_(norm.weight)
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("B", "T", "D", "layout", "activation", "affine"),
    [
        (3, 1, 64, "slice", "swish", True),
        (2, 5, 37, "every_other", "sigmoid", True),
        (1, 4, 16, "contiguous", "silu", False),
        (2, 0, 16, "slice", "swish", True),
    ],
)
def test_rms_norm_gated_kernel(B, T, D, layout, activation, affine, dtype):
    x, g = norm_inputs(B, T, D, dtype, "cpu", layout)
    norm = make_norm(D, activation, affine, "cpu")
    y = rms_norm_gated_fwd(x, g, norm.weight, norm.eps, activation)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_close("y", y, norm.forward_torch(x, g), TOLERANCES[dtype])


def test_rms_norm_gated_kernel_checks_shapes():
    x = torch.randn(2, 8)
    for g, weight in ((torch.randn(2, 7), None), (torch.randn(3, 8), None), (torch.randn(2, 8), torch.randn(7))):
        with pytest.raises(ValueError, match="rms_norm_gated_fwd"):
            rms_norm_gated_fwd(x, g, weight, 1e-5, "swish")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("B", "T", "D", "layout", "activation"),
    [(32, 1, 1024, "slice", "swish"), (4, 300, 256, "contiguous", "sigmoid"), (2, 7, 100, "every_other", "swish")],
)
def test_cuda_rms_norm_gated_matches_fla(B, T, D, layout, activation, dtype):
    """Without gradients the module runs our kernel, within one rounding of FLA's (the same
    float32 arithmetic, its sum perhaps in another order); with them, FLA's function."""
    x, g = norm_inputs(B, T, D, dtype, "cuda", layout)
    norm = make_norm(D, activation, True, "cuda")
    fla = rms_norm_gated(x, g.contiguous(), norm.weight, None, activation, eps=norm.eps)
    with torch.no_grad():
        y = norm(x, g)
    assert_close("y", y, fla, {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype])
    y_grad = norm(x.requires_grad_(), g)
    assert y_grad.grad_fn is not None and torch.equal(y_grad, fla)
