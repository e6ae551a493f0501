"""The gated norm's kernels, ``rms_norm_gated_fwd`` (inference) and ``rms_norm_gated`` (forward
and backward): through the interpreter on the CPU against the module's PyTorch math under
autograd, on gates (and inputs) at a stride; on the GPU against FLA's function, and the module's
choice between them."""

import pytest
import torch
from fla.modules.norm.fused_norm_gate import rms_norm_gated

from fla_factmem.modules import FusedRMSNormGated
from fla_factmem.modules import norm as norm_module
from fla_factmem.modules.norm import GATED_NORM_BWD_ROWS, rms_norm_gated_fwd
from fla_factmem.modules.norm import rms_norm_gated as our_rms_norm_gated
from tests.utils import assert_close, output_and_grads

# bf16: the interpreter truncates float32 to bfloat16 where the GPU rounds to nearest
TOLERANCES = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def norm_inputs(B, T, D, dtype, device, layout):
    """x and g [B, T, D]: both contiguous; g the slice of a wider projection's output (the layer's
    gate when decoding: rows at a stride, read in place); g every other element of a wider
    tensor (no unit step: copied for the kernel); or x with B and T swapped in memory (copied)."""
    x = torch.randn(B, T, D, device=device).to(dtype)
    g = (4 * torch.randn(B, T, D, device=device)).to(dtype)
    if layout == "slice":
        g = (4 * torch.randn(B, T, 3 * D + 5, device=device)).to(dtype)[..., D : 2 * D]
    elif layout == "every_other":
        g = (4 * torch.randn(B, T, 2 * D, device=device)).to(dtype)[..., ::2]
    elif layout == "x_transposed":
        x = torch.randn(T, B, D, device=device).to(dtype).transpose(0, 1)
    assert (layout == "contiguous") == (x.is_contiguous() and g.is_contiguous()) or B * T <= 1
    return x, g


def make_norm(D, activation, affine, device):
    norm = FusedRMSNormGated(D, elementwise_affine=affine, eps=1e-5, activation=activation).to(device)
    if affine:
        torch.nn.init.normal_(norm.weight)
    return norm


CASES = [
    (3, 1, 64, "slice", "swish", True),
    (2, 5, 37, "every_other", "sigmoid", True),
    (2, 3, 16, "x_transposed", "sigmoid", False),
    (1, 4, 16, "contiguous", "silu", False),
    (2, 3, 1, "slice", "swish", True),
    (2, 0, 16, "slice", "swish", True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("B", "T", "D", "layout", "activation", "affine"), CASES)
def test_rms_norm_gated_kernel(B, T, D, layout, activation, affine, dtype):
    x, g = norm_inputs(B, T, D, dtype, "cpu", layout)
    norm = make_norm(D, activation, affine, "cpu")
    y = rms_norm_gated_fwd(x, g, norm.weight, norm.eps, activation)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert_close("y", y, norm.forward_torch(x, g), TOLERANCES[dtype])


# more rows than one program of the backward takes, and not a multiple of them; not D = 1, where
# dx = rstd dn (1 - xhat^2) is eps over x^2 after a cancellation that no float32 order evaluates
# to 1e-6
BACKWARD_CASES = [c for c in CASES if c[2] > 1] + [(3, GATED_NORM_BWD_ROWS + 5, 48, "contiguous", "swish", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("B", "T", "D", "layout", "activation", "affine"), BACKWARD_CASES)
def test_rms_norm_gated_backward_kernel(B, T, D, layout, activation, affine, dtype):
    x, g = norm_inputs(B, T, D, dtype, "cpu", layout)
    norm = make_norm(D, activation, affine, "cpu")
    dy = torch.randn(B, T, D).to(dtype)
    weight = norm.weight
    if affine and layout == "slice":  # a weight at a stride, as the forward takes it
        weight = torch.nn.Parameter(torch.randn(2 * D)[::2])
    ours = output_and_grads(lambda *a: our_rms_norm_gated(*a, norm.eps, activation), (x, g, weight), dy)

    def reference(x, g, weight):
        gate = torch.nn.functional.silu(g.float()) if activation != "sigmoid" else torch.sigmoid(g.float())
        return norm_module.rms_norm_torch(x, weight, norm.eps) * gate

    ref = output_and_grads(reference, (x.float(), g.float(), weight), dy.float())
    assert ours[1].dtype == ours[2].dtype == dtype and ours[1].shape == x.shape and ours[2].shape == g.shape
    for name, a, b in zip(("y", "dx", "dg", "dw"), ours, ref):
        assert_close(name, a, b, TOLERANCES[dtype])


def test_rms_norm_gated_kernel_takes_a_strided_weight_and_checks_its_arguments():
    x, g = norm_inputs(2, 3, 8, torch.float32, "cpu", "slice")
    weight = torch.randn(16)[::2]
    y = rms_norm_gated_fwd(x, g, weight, 1e-5, "swish")
    assert_close("y", y, norm_module.rms_norm_torch(x, weight, 1e-5) * torch.nn.functional.silu(g), 1e-6)
    # g may have another shape with as many rows, as FLA's function takes it
    assert torch.equal(rms_norm_gated_fwd(x.reshape(6, 8), g, weight, 1e-5, "swish"), y.reshape(6, 8))
    for bad_g, bad_weight in ((g[..., :7], None), (g[:1], None), (g, torch.randn(7))):
        with pytest.raises(ValueError, match="rms_norm_gated_fwd"):
            rms_norm_gated_fwd(x, bad_g, bad_weight, 1e-5, "swish")
    with pytest.raises(ValueError, match="activation 'relu'"):
        rms_norm_gated_fwd(x, g, None, 1e-5, "relu")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("B", "T", "D", "layout", "activation", "affine"),
    [
        (32, 1, 1024, "slice", "swish", True),
        (4, 300, 256, "contiguous", "sigmoid", True),
        (2, 7, 100, "every_other", "swish", True),
        (3, 5, 64, "x_transposed", "sigmoid", False),
    ],
)
def test_cuda_rms_norm_gated_matches_fla(B, T, D, layout, activation, affine, dtype):
    """Our kernel within one rounding of FLA's (the same float32 arithmetic, its sum perhaps in
    another order)."""
    x, g = norm_inputs(B, T, D, dtype, "cuda", layout)
    norm = make_norm(D, activation, affine, "cuda")
    fla = rms_norm_gated(x.contiguous(), g.contiguous(), norm.weight, None, activation, eps=norm.eps)
    y = rms_norm_gated_fwd(x, g, norm.weight, norm.eps, activation)
    assert_close("y", y, fla, {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("B", "T", "D", "layout", "activation", "affine"),
    [
        (4, 2048, 1024, "contiguous", "swish", True),
        (2, 300, 256, "slice", "sigmoid", True),
        (3, 77, 100, "every_other", "swish", False),
    ],
)
def test_cuda_rms_norm_gated_backward_matches_fla(B, T, D, layout, activation, affine, dtype):
    """Forward and backward against FLA's function: the same float32 arithmetic, summed in
    another order (dw over other groups of rows)."""
    x, g = norm_inputs(B, T, D, dtype, "cuda", layout)
    norm = make_norm(D, activation, affine, "cuda")
    dy = torch.randn(B, T, D, device="cuda").to(dtype)
    ours = output_and_grads(lambda *a: our_rms_norm_gated(*a, norm.eps, activation), (x, g, norm.weight), dy)
    fla = output_and_grads(
        lambda x, g, w: rms_norm_gated(x.contiguous(), g.contiguous(), w, None, activation, eps=norm.eps),
        (x, g, norm.weight), dy,
    )  # fmt: skip
    for name, a, b in zip(("y", "dx", "dg", "dw"), ours, fla):
        assert_close(name, a, b, {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype])


@pytest.mark.cuda
def test_cuda_gated_norm_takes_our_kernel_exactly_without_autograd(monkeypatch):
    """Our inference kernel under no_grad and inference_mode, and with gradients enabled when
    nothing needs one; our autograd function with a gradient to track; FLA's function with a
    residual or prenorm."""
    calls = []

    def spy(*args):
        calls.append(True)
        return rms_norm_gated_fwd(*args)

    monkeypatch.setattr(norm_module, "rms_norm_gated_fwd", spy)
    x, g = norm_inputs(32, 1, 256, torch.bfloat16, "cuda", "slice")
    norm, frozen = make_norm(256, "swish", True, "cuda"), make_norm(256, "swish", False, "cuda")

    def takes_ours(call):
        calls.clear()
        out = call()
        return bool(calls), out

    with torch.no_grad():
        assert takes_ours(lambda: norm(x, g))[0]
        assert not takes_ours(lambda: norm(x, g, residual=torch.randn_like(x)))[0]
        assert not takes_ours(lambda: norm(x, g, residual=torch.randn_like(x), prenorm=True))[0]
    with torch.inference_mode():
        assert takes_ours(lambda: norm(x, g))[0]
    assert takes_ours(lambda: frozen(x, g))[0]
    ours, y = takes_ours(lambda: norm(x, g))  # the weight needs a gradient: our autograd function
    assert not ours and type(y.grad_fn).__name__ == "RMSNormGatedFunctionBackward"
