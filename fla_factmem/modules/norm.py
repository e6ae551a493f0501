"""RMS norms of FLA with a PyTorch path for CPU tensors, and kernels of ours for the gated one
without a residual: a one-row-a-program forward that reads its gate where it lies, and a
backward that keeps many rows in flight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from fla.modules import FusedRMSNormGated as FLAFusedRMSNormGated
from fla.modules import RMSNorm as FLARMSNorm
from torch.autograd.function import once_differentiable

from fla_factmem.modules.rows import rows_at_one_stride
from fla_factmem.ops.compiled_launch import CompiledLauncher
from fla_factmem.utils import cdiv, needs_autograd, next_power_of_2, on_device_of


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
        residual_in_fp32: without ``residual``, return the sum (then ``x``) in float32.

    Returns:
        ``y`` ``[..., D]`` in the dtype of ``x``, or ``(y, x + residual)`` when ``prenorm``; the
        sum is taken in float32 and returned, as FLA's kernel does, in the dtype of ``residual``
        (float32 under ``residual_in_fp32`` without one, else that of ``x``).
    """

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        if x.is_cuda:
            return super().forward(x, residual, prenorm, residual_in_fp32)
        return self.forward_torch(x, residual, prenorm, residual_in_fp32)

    def forward_torch(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        summed = x if residual is None else x.float() + residual.float()
        y = rms_norm_torch(summed, self.weight, self.eps)
        if self.bias is not None:
            y = y + self.bias.float()
        y = y.to(x.dtype)
        if not prenorm:
            return y
        # a bf16 block's output added to a float32 residual stream stays float32, as on the GPU
        residual_dtype = residual.dtype if residual is not None else torch.float32 if residual_in_fp32 else x.dtype
        return y, summed.to(residual_dtype)


@triton.heuristics({"STORE_RSTD": lambda args: args["rstd"] is not None})
@triton.jit
def rms_norm_gated_fwd_kernel(
    x, g, weight, y, rstd, stride_x, stride_g, eps, D: tl.constexpr, BD: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    SWISH: tl.constexpr, STORE_RSTD: tl.constexpr,
):  # fmt: skip
    """Row ``program_id`` of y [rows, D] = x / rms(x) * weight * act(g), act SiLU (SWISH) or
    sigmoid, for x's and g's rows stride_x and stride_g elements apart, in float32 as FLA's
    ``layer_norm_gated_fwd_kernel_row`` computes it; with a backward to come, 1 / rms(x) goes to
    rstd [rows] float32."""
    i = tl.program_id(0).to(tl.int64)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_x = tl.load(x + i * stride_x + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_rstd = 1 / tl.sqrt(tl.sum(b_x * b_x, axis=0) / D + eps)
    if STORE_RSTD:
        tl.store(rstd + i, b_rstd)
    b_y = b_x * b_rstd
    if HAS_WEIGHT:
        b_y = b_y * tl.load(weight + o_d, mask=m_d).to(tl.float32)
    b_g = tl.load(g + i * stride_g + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_y = b_y * b_g * tl.sigmoid(b_g) if SWISH else b_y * tl.sigmoid(b_g)
    tl.store(y + i * D + o_d, b_y.to(y.dtype.element_ty), mask=m_d)


@triton.jit
def rms_norm_gated_bwd_kernel(
    x, g, weight, rstd, dy, dx, dg, dw_parts, n_rows, stride_x, stride_g, D: tl.constexpr, ROWS: tl.constexpr,
    BR: tl.constexpr, BD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SWISH: tl.constexpr,
):  # fmt: skip
    """The backward of ``rms_norm_gated_fwd_kernel`` over rows [ROWS program_id, ROWS (program_id
    + 1)), BR at a time: dx and dg [rows, D] (contiguous) from dy [rows, D] (contiguous), x and g
    (rows stride_x and stride_g apart) and the forward's rstd, and the program's part of dw in
    row ``program_id`` of dw_parts [programs, D] float32, summed over the rows once at the end.
    Many programs of a few rows a step keep many loads in flight: FLA's kernel for rows over 512
    wide walks one row at a time in one program an SM."""
    i_p = tl.program_id(0)
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    if HAS_WEIGHT:
        b_w = tl.load(weight + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_dw = tl.zeros([BR, BD], dtype=tl.float32)
    for r0 in range(i_p * ROWS, i_p * ROWS + ROWS, BR):
        o_r = r0 + tl.arange(0, BR).to(tl.int64)
        m_r = o_r < n_rows
        m = m_r[:, None] & m_d[None, :]
        b_x = tl.load(x + o_r[:, None] * stride_x + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        b_g = tl.load(g + o_r[:, None] * stride_g + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        b_dy = tl.load(dy + o_r[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        b_rstd = tl.load(rstd + o_r, mask=m_r, other=0.0)
        b_xhat = b_x * b_rstd[:, None]
        b_s = tl.sigmoid(b_g)
        if SWISH:
            b_act, b_dact = b_g * b_s, b_s * (1 + b_g * (1 - b_s))
        else:
            b_act, b_dact = b_s, b_s * (1 - b_s)
        b_dn = b_dy * b_act
        if HAS_WEIGHT:
            b_dg = b_dy * b_xhat * b_w[None, :] * b_dact
            b_dw += b_dn * b_xhat
            b_dn = b_dn * b_w[None, :]
        else:
            b_dg = b_dy * b_xhat * b_dact
        b_dx = (b_dn - b_xhat * (tl.sum(b_dn * b_xhat, 1) / D)[:, None]) * b_rstd[:, None]
        tl.store(dx + o_r[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m)
        tl.store(dg + o_r[:, None] * D + o_d[None, :], b_dg.to(dg.dtype.element_ty), mask=m)
    if HAS_WEIGHT:
        tl.store(dw_parts + i_p.to(tl.int64) * D + o_d, tl.sum(b_dw, 0), mask=m_d)


RMS_NORM_GATED_FWD = CompiledLauncher(rms_norm_gated_fwd_kernel)
RMS_NORM_GATED_BWD = CompiledLauncher(rms_norm_gated_bwd_kernel)
ACTIVATIONS = ("swish", "silu", "sigmoid")


def _check_gated_norm(name: str, x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None, activation: str):
    D = x.shape[-1]
    if g.shape[-1] != D or g.numel() != x.numel() or (weight is not None and weight.shape != (D,)):
        shapes = f"x {tuple(x.shape)}, g {tuple(g.shape)}, weight {None if weight is None else tuple(weight.shape)}"
        raise ValueError(f"{name}: {shapes}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation {activation!r}, not swish, silu or sigmoid")
    if D * x.element_size() > 65536:  # FLA's bound too: one row per program, in registers
        raise ValueError(f"{name}: rows of {D} elements exceed 64 KB")


def _gated_norm_forward(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None, eps: float, activation: str, store_rstd: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rms_norm_gated_fwd``'s y, and with ``store_rstd`` the float32 ``[rows]`` 1 / rms(x) of
    each row for the backward (else None)."""
    _check_gated_norm("rms_norm_gated_fwd", x, g, weight, activation)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = x.numel() // max(x.shape[-1], 1)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device) if store_rstd else None
    if x.numel() == 0:
        return y, rstd
    x_rows, g_rows = rows_at_one_stride(x), rows_at_one_stride(g)
    weight = None if weight is None else weight.contiguous()
    D = x.shape[-1]
    BD = next_power_of_2(D)
    with on_device_of(x):
        RMS_NORM_GATED_FWD.launch(
            (n_rows,), x_rows, g_rows, weight, y, rstd, x_rows.stride(0), g_rows.stride(0), eps, D=D, BD=BD,
            HAS_WEIGHT=weight is not None, SWISH=activation in ("swish", "silu"), num_warps=min(8, max(1, BD // 256)),
        )  # fmt: skip
    return y, rstd


@torch.compiler.disable
def rms_norm_gated_fwd(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None, eps: float, activation: str
) -> torch.Tensor:
    """The gated RMS norm's forward in one kernel, no autograd: ``x``, ``g`` ``[..., D]`` with as
    many rows (as FLA's function takes them), their rows at any one stride each (the layer's gate
    is a view into its fused projection's output when decoding); ``weight`` ``[D]`` or None;
    ``activation`` ``swish``/``silu`` or ``sigmoid``. Returns ``[..., D]`` (x's shape)
    contiguous, in x's dtype."""
    return _gated_norm_forward(x, g, weight, eps, activation, store_rstd=False)[0]


# rows per program of the backward, and elements per step of its loop (2 rows of 1024; more rows
# at narrower widths) over its 8 warps
GATED_NORM_BWD_ROWS = 64
GATED_NORM_BWD_ROW_ELEMENTS = 2048


def rms_norm_gated_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gated RMS norm's backward: ``dy``, ``x``, ``g`` ``[..., D]`` as ``rms_norm_gated_fwd``
    takes x and g, ``rstd`` ``[rows]`` float32 from its forward (``rms_norm_gated``). Returns
    ``(dx, dg, dw)``: dx and dg contiguous in x's and g's shapes and dtypes, dw ``[D]`` in the
    weight's dtype (None without a weight)."""
    _check_gated_norm("rms_norm_gated_bwd", x, g, weight, activation)
    weight = None if weight is None else weight.contiguous()
    D = x.shape[-1]
    n_rows = rstd.numel()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dg = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    BD = next_power_of_2(D)
    BR = max(1, min(16, GATED_NORM_BWD_ROW_ELEMENTS // BD))
    ROWS = max(BR, GATED_NORM_BWD_ROWS)
    n_programs = cdiv(n_rows, ROWS)
    dw_parts = torch.empty(n_programs, D, dtype=torch.float32, device=x.device) if weight is not None else None
    if n_rows > 0:
        x_rows, g_rows = rows_at_one_stride(x), rows_at_one_stride(g)
        with on_device_of(x):
            RMS_NORM_GATED_BWD.launch(
                (n_programs,), x_rows, g_rows, weight, rstd, dy.contiguous(), dx, dg, dw_parts, n_rows,
                x_rows.stride(0), g_rows.stride(0), D=D, ROWS=ROWS, BR=BR, BD=BD, HAS_WEIGHT=weight is not None,
                SWISH=activation in ("swish", "silu"), num_warps=8,
            )  # fmt: skip
    dw = None if weight is None else dw_parts.sum(0).to(weight.dtype)
    return dx, dg, dw


class RMSNormGatedFunction(torch.autograd.Function):
    """``rms_norm_gated``: our forward, keeping each row's 1 / rms, and ``rms_norm_gated_bwd``."""

    @staticmethod
    def forward(ctx, x, g, weight, eps, activation):
        weight = None if weight is None else weight.contiguous()  # the backward reads it at unit steps
        y, rstd = _gated_norm_forward(x, g, weight, eps, activation, store_rstd=True)
        ctx.save_for_backward(x, g, weight, rstd)
        ctx.activation = activation
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, g, weight, rstd = ctx.saved_tensors
        dx, dg, dw = rms_norm_gated_bwd(dy, x, g, weight, rstd, ctx.activation)
        return dx, dg, dw, None, None


@torch.compiler.disable
def rms_norm_gated(
    x: torch.Tensor, g: torch.Tensor, weight: torch.Tensor | None, eps: float, activation: str
) -> torch.Tensor:
    """The gated RMS norm with autograd, in two kernels of ours: ``x``, ``g`` ``[..., D]``,
    ``weight`` ``[D]`` or None, as ``rms_norm_gated_fwd`` takes them. Returns ``[..., D]`` in
    x's dtype. Against FLA's function at rows over 512 wide (the layer's norm over all heads),
    its backward keeps many rows in flight (``rms_norm_gated_bwd_kernel``). Under autograd the
    saved tensors are x, g, the weight and 1 / rms(x) per row."""
    return RMSNormGatedFunction.apply(x, g, weight, eps, activation)


class FusedRMSNormGated(FLAFusedRMSNormGated):
    """FLA's gated RMS norm: ``rmsnorm(x) * weight * act(g)`` with act SiLU (``swish``) or sigmoid.

    Without a residual or prenorm, CUDA tensors take our kernels; with either, FLA's function.
    Without autograd (no gradient enabled, or none of x, g and the weight requiring one) that is
    ``rms_norm_gated_fwd``, which reads g's rows where they lie. FLA's function makes every
    input contiguous first: decoding, where the layer's gate is a view into its fused
    projection's output, that copy is a launch a layer of its own (an elementwise kernel of 2.2
    us in a profile of the 340M model's decode step on an H200, and some 0.5 us of gap between
    kernels under CUDA-graph replay). With autograd it is ``rms_norm_gated``: at the layer's
    width (all heads together, 1024 in the 340M model) FLA's backward walks the rows one at a
    time in one program an SM, 248.5 us at that model's training shape (32768 rows, bf16, H200),
    where ours took 115.9 (benchmarks/NOTES.md, session 19).

    Args of ``forward``:
        x, g: ``[..., D]``; the norm runs over the last dim.

    Returns:
        ``[..., D]`` in the dtype of ``x``.
    """

    def forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        if x.is_cuda:
            if residual is not None or prenorm:
                return super().forward(x, g, residual, prenorm, residual_in_fp32)
            if needs_autograd(x, g, self.weight):
                return rms_norm_gated(x, g, self.weight, self.eps, self.activation)
            return rms_norm_gated_fwd(x, g, self.weight, self.eps, self.activation)
        if residual is not None or prenorm:
            raise NotImplementedError("FusedRMSNormGated on the CPU takes no residual")
        return self.forward_torch(x, g)

    def forward_torch(self, x, g):
        gate = F.silu(g.float()) if self.activation in ("swish", "silu") else torch.sigmoid(g.float())
        return (rms_norm_torch(x, self.weight, self.eps) * gate).to(x.dtype)
