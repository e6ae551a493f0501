"""FLA's short causal convolution with a PyTorch path for CPU tensors, and kernels of ours for
its calls without a cache in or out, a residual or a mask (training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from fla.modules import ShortConvolution as FLAShortConvolution
from fla.ops.utils.index import prepare_position_ids
from fla.utils import tensor_cache
from torch.autograd.function import once_differentiable

from fla_factmem.ops.compiled_launch import CompiledLauncher
from fla_factmem.utils import cdiv, host_offsets, next_power_of_2, on_device_of

SWITCHES = {
    "HAS_BIAS": lambda args: args["bias"] is not None,
    "IS_VARLEN": lambda args: args["positions"] is not None,
}


@triton.jit
def tile_rows(positions, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """The rows of the program's tile, ``program_id(0)`` along T and ``program_id(2)`` along B, of
    x [B T, D] (sequences of T, or with ``positions`` [T] int32 one packed row of them, B = 1): their
    flat indices o_t (int64), whether they exist, and each one's position in its sequence."""
    o_s = tl.program_id(0) * BT + tl.arange(0, BT)
    m_t = o_s < T
    o_t = tl.program_id(2).to(tl.int64) * T + o_s
    if IS_VARLEN:
        return o_t, m_t, tl.load(positions + o_t, mask=m_t, other=0)
    return o_t, m_t, o_s


@triton.jit
def preactivation(x, weight, bias, o_t, pos, m_t, o_d, m_d, D: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr):
    """[BT, BD] float32: sum_j weight[d, j] x[t - (W - 1) + j, d] (+ bias[d]) at rows o_t and
    columns o_d of x [rows, D], the taps before a sequence's first token zero; and the shifted
    inputs, a tuple of W [BT, BD] (tap j's)."""
    acc = tl.zeros([o_t.shape[0], o_d.shape[0]], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    taps = ()
    for j in tl.static_range(W):
        back = W - 1 - j
        m = (m_t & (pos >= back))[:, None] & m_d[None, :]
        x_j = tl.load(x + (o_t - back)[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.load(weight + o_d * W + j, mask=m_d, other=0.0).to(tl.float32)[None, :] * x_j
        taps = taps + (x_j,)
    return acc, taps


@triton.heuristics(SWITCHES)
@triton.jit
def short_conv_fwd_kernel(
    x, weight, bias, positions, y, T, D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    SILU: tl.constexpr, HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """y [B T, D] = act(depthwise causal convolution of x [B T, D] with weight [D, W]), act SiLU
    or none, per sequence (``tile_rows``). [BT, BD] tiles."""
    o_t, m_t, pos = tile_rows(positions, T, BT, IS_VARLEN)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_y = preactivation(x, weight, bias, o_t, pos, m_t, o_d, m_d, D, W, HAS_BIAS)[0]
    if SILU:
        b_y = b_y * tl.sigmoid(b_y)
    tl.store(y + o_t[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.heuristics(SWITCHES)
@triton.jit
def short_conv_bwd_pre_kernel(
    x, weight, bias, positions, dy, dpre, dw_parts, T, D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
    BD: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """The gradient on the pre-activation, dpre [B T, D] float32 = dy act'(pre) (pre recomputed
    from x), and the tile's part of the weight's gradient, dw_parts [B, tiles along T, D, W + 1]
    float32 (the bias's in column W)."""
    o_t, m_t, pos = tile_rows(positions, T, BT, IS_VARLEN)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_d = o_d < D
    m = m_t[:, None] & m_d[None, :]
    i_t = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
    pre, taps = preactivation(x, weight, bias, o_t, pos, m_t, o_d, m_d, D, W, HAS_BIAS)
    b_dpre = tl.load(dy + o_t[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)
    if SILU:
        s = tl.sigmoid(pre)
        b_dpre = b_dpre * s * (1 + pre * (1 - s))
    tl.store(dpre + o_t[:, None] * D + o_d[None, :], b_dpre, mask=m)
    parts = dw_parts + i_t.to(tl.int64) * D * (W + 1) + o_d * (W + 1)
    for j in tl.static_range(W):
        tl.store(parts + j, tl.sum(b_dpre * taps[j], 0), mask=m_d)
    if HAS_BIAS:
        tl.store(parts + W, tl.sum(b_dpre, 0), mask=m_d)


@triton.heuristics({"IS_VARLEN": SWITCHES["IS_VARLEN"]})
@triton.jit
def short_conv_bwd_dx_kernel(
    dpre, weight, positions, dx, T, D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """dx [B T, D] = sum_j weight[d, j] dpre[t + W - 1 - j, d] over the rows of t's sequence."""
    o_t, m_t, pos = tile_rows(positions, T, BT, IS_VARLEN)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_dx = tl.zeros([BT, BD], dtype=tl.float32)
    for j in tl.static_range(W):
        ahead = W - 1 - j
        o_a = o_t + ahead
        # row t + ahead took x[t] through tap j if it lies in t's sequence, ahead rows into it
        if IS_VARLEN:  # one packed row of T: o_t is the row along it
            m_a = m_t & (o_t + ahead < T)
            same = m_a & (tl.load(positions + o_a, mask=m_a, other=0) >= ahead)
        else:
            same = m_t & (pos + ahead < T)
        b_d = tl.load(dpre + o_a[:, None] * D + o_d[None, :], mask=same[:, None] & m_d[None, :], other=0.0)
        b_dx += tl.load(weight + o_d * W + j, mask=m_d, other=0.0).to(tl.float32)[None, :] * b_d
    tl.store(dx + o_t[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


SHORT_CONV_FWD = CompiledLauncher(short_conv_fwd_kernel)
SHORT_CONV_BWD_PRE = CompiledLauncher(short_conv_bwd_pre_kernel)
SHORT_CONV_BWD_DX = CompiledLauncher(short_conv_bwd_dx_kernel)
# [BT, BD] tiles of every kernel, 4 warps
CONV_BT, CONV_BD = 64, 64


def _conv_launch(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int, tuple[int, int, int]]:
    """D, W, the block of channels and the grid (tiles along T, blocks of channels, B)."""
    B, T, D = x.shape
    BD = min(CONV_BD, next_power_of_2(D))
    return D, weight.shape[-1], BD, (cdiv(T, CONV_BT), cdiv(D, BD), B)


class ShortConvolutionFunction(torch.autograd.Function):
    """``short_convolution``: forward and backward in our kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, positions, T, silu):
        D, W, BD, grid = _conv_launch(x, weight)
        y = torch.empty_like(x)
        if x.numel() > 0:
            with on_device_of(x):
                SHORT_CONV_FWD.launch(
                    grid, x, weight, bias, positions, y, T, D=D, W=W, BT=CONV_BT, BD=BD, SILU=silu, num_warps=4
                )
        ctx.save_for_backward(x, weight, bias, positions)
        ctx.T, ctx.silu = T, silu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, positions = ctx.saved_tensors
        D, W, BD, grid = _conv_launch(x, weight)
        dy = dy.contiguous()
        dpre = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        dw_parts = torch.zeros(grid[2] * grid[0], D, W + 1, dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x)
        if x.numel() > 0:
            common = dict(D=D, W=W, BT=CONV_BT, BD=BD, num_warps=4)
            with on_device_of(x):
                SHORT_CONV_BWD_PRE.launch(
                    grid, x, weight, bias, positions, dy, dpre, dw_parts, ctx.T, SILU=ctx.silu, **common
                )
                SHORT_CONV_BWD_DX.launch(grid, dpre, weight, positions, dx, ctx.T, **common)
        dw = dw_parts.sum(0)
        db = None if bias is None else dw[:, W].to(bias.dtype)
        return dx, dw[:, :W].to(weight.dtype), db, None, None, None


@tensor_cache
def sequence_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Each token's position in its sequence, ``[T]`` int32, for the sequences of ``cu_seqlens``
    ``[N + 1]``: FLA's ``prepare_position_ids`` cast once per ``cu_seqlens`` tensor, not in every
    layer's call."""
    return prepare_position_ids(cu_seqlens).to(torch.int32)


def short_convolution(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = "silu",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution with autograd, ``act(conv(x))`` per channel, act SiLU
    (``silu``/``swish``) or none, in kernels of ours: ``x`` ``[B, T, D]`` (B = 1 with
    ``cu_seqlens`` ``[N + 1]``: sequences packed along T, none seeing another's inputs; FLA's
    ``prepare_position_ids`` reads their lengths on the host once per ``cu_seqlens`` tensor),
    ``weight`` ``[D, W]``, ``bias`` ``[D]`` or None. Returns ``[B, T, D]`` in x's dtype. No cache
    in or out: that is FLA's ``causal_conv1d``.

    The backward recomputes the pre-activation in its first kernel, which writes its gradient in
    float32 and the tiles' parts of the weight's; the second adds the input's gradient over the
    taps. FLA's recomputes the pre-activation in a forward of its own and its SiLU once per tap.
    In the 340M model's training step (bf16, H200, in turns in one process; benchmarks/NOTES.md,
    session 19) the step took 211.9 ms with these kernels and 214.4 with FLA's, although their
    kernels alone are not faster: 407 against 370 us of kernels a forward+backward at [4, 8192,
    1024] bf16, the first backward kernel 200 us of it."""
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"short_convolution: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"short_convolution: bias {tuple(bias.shape)} for {x.shape[-1]} channels")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"short_convolution: activation {activation!r}, not silu, swish or None")
    positions = None
    if cu_seqlens is not None:
        if x.shape[0] != 1 or cu_seqlens.device != x.device:
            raise ValueError(
                f"short_convolution: packed sequences take B = 1 and cu_seqlens on x's device; got x "
                f"{tuple(x.shape)} on {x.device}, cu_seqlens on {cu_seqlens.device}"
            )
        positions = sequence_positions(cu_seqlens)
        if positions.numel() != x.shape[1]:
            raise ValueError(f"short_convolution: cu_seqlens spans {positions.numel()} tokens; x has {x.shape[1]}")
    bias = None if bias is None else bias.contiguous()
    return ShortConvolutionFunction.apply(
        x.contiguous(), weight.contiguous(), bias, positions, x.shape[1], activation is not None
    )


class ShortConvolution(FLAShortConvolution):
    """Depthwise causal convolution over time with an optional SiLU, and FLA's cache layout.

    On CUDA tensors, calls of ``[B, T, D]`` inputs without a cache in or out, a residual, a mask
    or FLA's further options (training) take ``short_convolution``; the others FLA's kernels.

    Args of ``forward``:
        x: ``[B, T, D]`` (B = 1 with ``cu_seqlens``).
        residual: optional ``[B, T, D]`` added to the output.
        mask: optional ``[B, T]`` 0/1 padding mask; padded inputs count as zeros.
        cache: optional ``[N, D, W]``: the last W inputs of every sequence (newest last).
        output_final_state: whether to return the updated cache.
        cu_seqlens: optional ``[N + 1]`` offsets of sequences packed along T.

    Returns:
        ``y`` ``[B, T, D]`` and the cache ``[N, D, W]`` (None unless ``output_final_state``).
    """

    def forward(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **kwargs):
        if x.is_cuda:
            # FLA's own options (its CUDA backend, context parallelism, its layouts) stay with FLA
            plain = residual is None and mask is None and x.dim() == 3 and self.backend == "triton"
            if plain and cache is None and not output_final_state and all(v is None for v in kwargs.values()):
                weight = self.weight.squeeze(1)
                return short_convolution(x, weight, self.bias, self.activation, cu_seqlens), None
            return super().forward(x, residual, mask, cache, output_final_state, cu_seqlens, **kwargs)
        return self.forward_torch(x, residual, mask, cache, output_final_state, cu_seqlens)

    def forward_torch(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None):
        if mask is not None:
            if cu_seqlens is not None:
                raise ValueError("`mask` and `cu_seqlens` cannot be provided at the same time")
            x = x * mask[..., None].to(x.dtype)
        if cu_seqlens is None:
            y, final_state = self._convolve(x, cache)
        else:
            offsets = host_offsets(cu_seqlens, x.shape[1])
            pieces = [
                self._convolve(x[:, bos:eos], None if cache is None else cache[i : i + 1])
                for i, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:]))
            ]
            y = torch.cat([p[0] for p in pieces], dim=1)
            final_state = torch.cat([p[1] for p in pieces], dim=0)
        if residual is not None:
            y = y + residual
        return y, final_state if output_final_state else None

    def _convolve(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of equal-length sequences: ``x`` [B, T, D], ``cache`` [B, D, W] or None."""
        B, T, D = x.shape
        W = self.kernel_size[0]
        past = x.new_zeros(B, D, W) if cache is None else cache.to(x.dtype)
        window = torch.cat([past, x.transpose(1, 2)], dim=-1)  # [B, D, W + T]
        if T == 0:  # an empty sequence (a packed one, or a fully padded row): the cache as it was
            return x.new_empty(B, 0, D), window.contiguous()
        bias = None if self.bias is None else self.bias.float()
        # the first input column only ever feeds the cache: the convolution sees the last W - 1 past inputs
        y = F.conv1d(window[..., 1:].float(), self.weight.float(), bias, groups=D)
        if self.activation is not None:
            y = F.silu(y)
        return y.transpose(1, 2).to(x.dtype), window[..., -W:].contiguous()
