"""``sigmoid(x + bias)`` in one kernel: the layer's rates eta and mu from their projection.

Decoding runs a step's kernels back to back, a few microseconds each, so every launch counts:
PyTorch's add and sigmoid are two (in a profile of the 340M model's decode step on an H200, the
sigmoid took 1.3 us and the add on its strided input 1.6 us; under CUDA-graph replay each launch
adds about half a microsecond more), this is one."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla_factmem.modules.rows import rows_at_one_stride
from fla_factmem.ops.compiled_launch import CompiledLauncher
from fla_factmem.utils import cdiv, next_power_of_2, on_device_of

# elements per program: a decode step's rows fit in one program
BLOCK_ELEMENTS = 4096


@triton.jit
def biased_sigmoid_kernel(x, bias, y, n_rows, stride_x, C: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """For BR of the n_rows rows of x (stride_x elements apart, C contiguous elements each):
    y [n_rows, C] = sigmoid(x + bias), bias [C]. The bias is rounded to x's dtype and so is the
    sum, as PyTorch's add in x's dtype would leave them."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_c = tl.arange(0, BC)
    m_c = o_c < C
    m = (o_r < n_rows)[:, None] & m_c[None, :]
    b_x = tl.load(x + o_r.to(tl.int64)[:, None] * stride_x + o_c[None, :], mask=m, other=0.0)
    b_bias = tl.load(bias + o_c, mask=m_c, other=0.0).to(b_x.dtype).to(tl.float32)
    b_s = (b_x.to(tl.float32) + b_bias[None, :]).to(b_x.dtype).to(tl.float32)
    tl.store(y + o_r.to(tl.int64)[:, None] * C + o_c[None, :], tl.sigmoid(b_s).to(y.dtype.element_ty), mask=m)


BIASED_SIGMOID = CompiledLauncher(biased_sigmoid_kernel)


def biased_sigmoid_fwd(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The kernel, no autograd: ``x`` ``[..., C]`` (its rows at any one stride, as a slice of a
    fused projection's output), ``bias`` ``[C]``; returns ``[..., C]`` contiguous, in x's dtype."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    C = x.shape[-1]
    rows = rows_at_one_stride(x)
    n_rows = rows.shape[0]
    BC = next_power_of_2(C)
    BR = min(next_power_of_2(n_rows), max(1, BLOCK_ELEMENTS // BC))
    with on_device_of(x):
        BIASED_SIGMOID.launch(
            (cdiv(n_rows, BR),), rows, bias.contiguous(), y, n_rows, rows.stride(0), C=C, BR=BR, BC=BC,
            num_warps=4,
        )  # fmt: skip
    return y


class BiasedSigmoidFunction(torch.autograd.Function):
    """``biased_sigmoid_fwd`` with autograd: dx = dy y (1 - y), and the bias's gradient its sum
    over the rows, in float32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = biased_sigmoid_fwd(x, bias)
        ctx.save_for_backward(y)
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (y,) = ctx.saved_tensors
        dx = torch.ops.aten.sigmoid_backward(dy, y)
        if not ctx.needs_input_grad[1]:
            return dx, None
        return dx, dx.reshape(-1, dx.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)


@torch.compiler.disable
def biased_sigmoid(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``sigmoid(x + bias)`` with the bias rounded to x's dtype first (as ``nn.Linear`` adds its
    bias under autocast): one Triton kernel on CUDA tensors, PyTorch's two ops on CPU ones and
    in float64 (which the kernel, computing in float32, would not keep).

    Args:
        x: ``[..., C]``; its rows may lie at any one stride (a slice of a fused projection's output).
        bias: ``[C]``.

    Returns:
        ``[..., C]`` contiguous, in x's dtype.
    """
    if bias.dim() != 1 or x.dim() == 0 or x.shape[-1] != bias.shape[0]:
        raise ValueError(f"biased_sigmoid: bias of shape {tuple(bias.shape)} for x of shape {tuple(x.shape)}")
    if not x.is_cuda or x.dtype == torch.float64:
        return torch.sigmoid(x + bias.to(x.dtype))
    return BiasedSigmoidFunction.apply(x, bias)
