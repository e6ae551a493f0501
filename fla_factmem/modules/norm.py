"""RMS norms of FLA with a PyTorch path for CPU tensors, and a one-kernel inference forward of
the gated one that reads its gate where it lies."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from fla.modules import FusedRMSNormGated as FLAFusedRMSNormGated
from fla.modules import RMSNorm as FLARMSNorm

from fla_factmem.modules.rows import rows_at_one_stride
from fla_factmem.ops.compiled_launch import CompiledLauncher
from fla_factmem.utils import needs_autograd, next_power_of_2, on_device_of


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim, computed in float32; returns float32."""
    x = x.float()
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.float()


class RMSNorm(FLARMSNorm):
    """FLA's ``RMSNorm`` (optionally adding a residual first, ``prenorm`` returning the sum too).

    Args of ``forward``:
        x: ``[..., D]``.
        residual: optional ``[..., D]`` added to ``x`` before the norm.
        prenorm: if True, also return ``x + residual`` (the new residual stream).
        residual_in_fp32: keep that sum in float32.

    Returns:
        ``y`` ``[..., D]`` in the dtype of ``x``, or ``(y, x + residual)`` when ``prenorm``.
    """

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        if x.is_cuda:
            return super().forward(x, residual, prenorm, residual_in_fp32)
        return self.forward_torch(x, residual, prenorm, residual_in_fp32)

    def forward_torch(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        summed = x if residual is None else x + residual
        y = rms_norm_torch(summed, self.weight, self.eps)
        if self.bias is not None:
            y = y + self.bias.float()
        y = y.to(x.dtype)
        if not prenorm:
            return y
        return y, summed.float() if residual_in_fp32 else summed.to(x.dtype)


@triton.jit
def rms_norm_gated_fwd_kernel(
    x, g, weight, y, stride_x, stride_g, eps, D: tl.constexpr, BD: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    SWISH: tl.constexpr,
):  # fmt: skip
    """Row ``program_id`` of y [rows, D] = x / rms(x) * weight * act(g), act SiLU (SWISH) or
    sigmoid, for x's and g's rows stride_x and stride_g elements apart, in float32 as FLA's
    ``layer_norm_gated_fwd_kernel_row`` computes it."""
    i = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_x = tl.load(x + i * stride_x + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_y = b_x * (1 / tl.sqrt(tl.sum(b_x * b_x, axis=0) / D + eps))
    if HAS_WEIGHT:
        b_y = b_y * tl.load(weight + o_d, mask=m_d).to(tl.float32)
    b_g = tl.load(g + i * stride_g + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_y = b_y * b_g * tl.sigmoid(b_g) if SWISH else b_y * tl.sigmoid(b_g)
    tl.store(y + i * D + o_d, b_y.to(y.dtype.element_ty), mask=m_d)


RMS_NORM_GATED_FWD = CompiledLauncher(rms_norm_gated_fwd_kernel)


def rms_norm_gated_fwd(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None, eps: float, activation: str
) -> torch.Tensor:
    """The gated RMS norm's forward in one kernel, no autograd: ``x``, ``g`` ``[..., D]`` with as
    many rows (as FLA's function takes them), their rows at any one stride each (the layer's gate
    is a view into its fused projection's output when decoding); ``weight`` ``[D]`` or None;
    ``activation`` ``swish``/``silu`` or ``sigmoid``. Returns ``[..., D]`` (x's shape)
    contiguous, in x's dtype."""
    D = x.shape[-1]
    if g.shape[-1] != D or g.numel() != x.numel() or (weight is not None and weight.shape != (D,)):
        shapes = f"x {tuple(x.shape)}, g {tuple(g.shape)}, weight {None if weight is None else tuple(weight.shape)}"
        raise ValueError(f"rms_norm_gated_fwd: {shapes}")
    if activation not in ("swish", "silu", "sigmoid"):
        raise ValueError(f"rms_norm_gated_fwd: activation {activation!r}, not swish, silu or sigmoid")
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    if D * x.element_size() > 65536:  # FLA's bound too: one row per program, in registers
        raise ValueError(f"rms_norm_gated_fwd: rows of {D} elements exceed 64 KB")
    x_rows, g_rows = rows_at_one_stride(x), rows_at_one_stride(g)
    weight = None if weight is None else weight.contiguous()
    BD = next_power_of_2(D)
    with on_device_of(x):
        RMS_NORM_GATED_FWD.launch(
            (x_rows.shape[0],), x_rows, g_rows, weight, y, x_rows.stride(0), g_rows.stride(0), eps, D=D, BD=BD,
            HAS_WEIGHT=weight is not None, SWISH=activation in ("swish", "silu"), num_warps=min(8, max(1, BD // 256)),
        )  # fmt: skip
    return y


class FusedRMSNormGated(FLAFusedRMSNormGated):
    """FLA's gated RMS norm: ``rmsnorm(x) * weight * act(g)`` with act SiLU (``swish``) or sigmoid.

    Without autograd (no gradient enabled, or none of x, g and the weight requiring one) and
    without a residual or prenorm, CUDA tensors take ``rms_norm_gated_fwd``, which reads g's rows
    where they lie. FLA's function makes every input contiguous first: decoding, where the
    layer's gate is a view into its fused projection's output, that copy is a launch a layer of
    its own (an elementwise kernel of 2.2 us in a profile of the 340M model's decode step on an
    H200, and some 0.5 us of gap between kernels under CUDA-graph replay).

    Args of ``forward``:
        x, g: ``[..., D]``; the norm runs over the last dim.

    Returns:
        ``[..., D]`` in the dtype of ``x``.
    """

    def forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        if x.is_cuda:
            if residual is None and not prenorm and not needs_autograd(x, g, self.weight):
                return rms_norm_gated_fwd(x, g, self.weight, self.eps, self.activation)
            return super().forward(x, g, residual, prenorm, residual_in_fp32)
        if residual is not None or prenorm:
            raise NotImplementedError("FusedRMSNormGated on the CPU takes no residual")
        return self.forward_torch(x, g)

    def forward_torch(self, x, g):
        gate = F.silu(g.float()) if self.activation in ("swish", "silu") else torch.sigmoid(g.float())
        return (rms_norm_torch(x, self.weight, self.eps) * gate).to(x.dtype)
