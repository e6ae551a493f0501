"""FLA's modules with a CPU path: the PyTorch math against plain references, and on the GPU
against FLA's own Triton kernels."""

import pytest
import torch
import torch.nn.functional as F

from fla_factmem.modules import FusedRMSNormGated, GatedMLP, RMSNorm, ShortConvolution
from tests.utils import assert_close


def causal_conv_reference(conv, x):
    W = conv.kernel_size[0]
    y = F.conv1d(F.pad(x.transpose(1, 2), (W - 1, 0)), conv.weight, conv.bias, groups=x.shape[-1])
    return F.silu(y).transpose(1, 2)


@pytest.mark.parametrize("bias", [False, True])
def test_short_convolution_matches_causal_conv1d(bias):
    conv = ShortConvolution(12, 4, bias=bias)
    x = torch.randn(2, 9, 12)
    y, _ = conv(x)
    assert_close("y", y, causal_conv_reference(conv, x), 1e-6)


@pytest.mark.parametrize("split", [1, 2, 7])
def test_short_convolution_cache_continues_the_sequence(split):
    conv = ShortConvolution(8, 4)
    x = torch.randn(3, 10, 8)
    y_full, state_full = conv(x, output_final_state=True)
    y1, cache = conv(x[:, :split], output_final_state=True)
    y2, state = conv(x[:, split:], cache=cache, output_final_state=True)
    assert_close("y", torch.cat([y1, y2], 1), y_full, 1e-6)
    assert torch.equal(state, state_full)
    assert torch.equal(state_full, x[:, -4:].transpose(1, 2))  # FLA's layout: the last W inputs, newest last


@pytest.mark.parametrize("packed", [False, True])
def test_short_convolution_decoding_updates_the_cache_in_place(packed):
    """As FLA's step: one token a sequence without autograd writes the new window into ``cache``,
    also when the final state is not asked for; with autograd the cache is left alone."""
    conv = ShortConvolution(8, 4)
    x = torch.randn(1, 3, 8) if packed else torch.randn(3, 1, 8)
    cu_seqlens = torch.tensor([0, 1, 2, 3]) if packed else None
    cache = torch.randn(3, 8, 4)
    _, wanted = conv(x, cache=cache.clone(), output_final_state=True, cu_seqlens=cu_seqlens)
    with torch.no_grad():
        y, state = conv(x, cache=cache, cu_seqlens=cu_seqlens)
    assert state is None and torch.equal(cache, wanted.detach())
    before = cache.clone()
    conv(x, cache=cache, cu_seqlens=cu_seqlens)
    assert torch.equal(cache, before), "with autograd, FLA returns the new state and leaves the cache"


def test_short_convolution_takes_heads_as_fla_does():
    conv = ShortConvolution(6, 4)
    x = torch.randn(2, 5, 2, 3)
    y, state = conv(x, output_final_state=True)
    y_flat, state_flat = conv(x.flatten(2), output_final_state=True)
    assert y.shape == x.shape and torch.equal(y.flatten(2), y_flat) and torch.equal(state, state_flat)


def test_short_convolution_packed_equals_per_sequence():
    conv = ShortConvolution(8, 3)
    lengths = [5, 0, 1, 9]
    xs = [torch.randn(1, n, 8) for n in lengths]
    cu_seqlens = torch.tensor([0, 5, 5, 6, 15])
    y, state = conv(torch.cat(xs, 1), cu_seqlens=cu_seqlens, output_final_state=True)
    for i, x in enumerate(xs):
        y_i, state_i = conv(x, output_final_state=True)
        assert_close(f"y[{i}]", y[:, cu_seqlens[i] : cu_seqlens[i + 1]], y_i, 1e-6)
        assert torch.equal(state[i : i + 1], state_i)


def test_rms_norm_prenorm_returns_the_residual_sum():
    norm = RMSNorm(16, eps=1e-6)
    x, residual = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    y, summed = norm(x, residual, prenorm=True)
    s = x + residual
    assert_close("y", y, s / s.square().mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight, 1e-6)
    assert torch.equal(summed, s)


@pytest.mark.parametrize(
    ("residual_dtype", "residual_in_fp32", "wanted"),
    [(torch.float32, False, torch.float32), (torch.bfloat16, True, torch.bfloat16), (None, True, torch.float32),
     (None, False, torch.bfloat16)],
)  # fmt: skip
def test_rms_norm_prenorm_sum_takes_fla_kernels_dtype(residual_dtype, residual_in_fp32, wanted):
    """As FLA's kernel: the sum in float32, returned in the residual's dtype (a bf16 block's output
    added to a float32 residual stream stays float32), or float32 under residual_in_fp32 without one."""
    norm = RMSNorm(16, eps=1e-6)
    x = torch.randn(2, 3, 16).bfloat16()
    residual = None if residual_dtype is None else torch.randn(2, 3, 16).to(residual_dtype)
    y, summed = norm(x, residual, prenorm=True, residual_in_fp32=residual_in_fp32)
    exact = x.float() + (0 if residual is None else residual.float())
    assert y.dtype == torch.bfloat16 and summed.dtype == wanted
    assert torch.equal(summed, exact.to(wanted))


def test_gated_rms_norm():
    norm = FusedRMSNormGated(16, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x, g = torch.randn(4, 16), torch.randn(4, 16)
    expected = x / x.square().mean(-1, keepdim=True).add(1e-5).sqrt() * norm.weight * F.silu(g)
    assert_close("y", norm(x, g), expected, 1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_paths_match_fla_kernels_on_gpu(dtype):
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    x = torch.randn(2, 37, 64, device="cuda", dtype=dtype)
    conv = ShortConvolution(64, 4, bias=True).cuda().to(dtype)
    cache = torch.randn(2, 64, 4, device="cuda", dtype=dtype)
    y, state = conv(x, cache=cache, output_final_state=True)
    y_ref, state_ref = conv.forward_torch(x, cache=cache, output_final_state=True)
    assert_close("conv y", y, y_ref, tol)
    assert_close("conv state", state, state_ref, tol)

    norm = RMSNorm(64).cuda()
    residual = torch.randn_like(x)
    for stream in (residual, residual.float()):
        for got, ref in zip(norm(x, stream, True), norm.forward_torch(x, stream, True)):
            assert got.dtype == ref.dtype
            assert_close("rms norm", got, ref, tol)
    gated = FusedRMSNormGated(64).cuda()
    assert_close("gated norm", gated(x, residual), gated.forward_torch(x, residual), tol)
    mlp = GatedMLP(64, hidden_ratio=4).cuda().to(dtype)
    assert_close("mlp", mlp(x), mlp.forward_torch(x), tol)
