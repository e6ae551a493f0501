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
def tile_rows(positions, i_t, i_b, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """The rows of tile i_t along T of row i_b of x [B T, D] (sequences of T, or with
    ``positions`` [T] int32 one packed row of them, B = 1): their index along T, flat index
    (int64), whether they exist, and each one's position in its sequence."""
    o_s = i_t * BT + tl.arange(0, BT)
    m_t = o_s < T
    o_t = i_b.to(tl.int64) * T + o_s
    if IS_VARLEN:
        return o_s, o_t, m_t, tl.load(positions + o_t, mask=m_t, other=0)
    return o_s, o_t, m_t, o_s


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
    _, o_t, m_t, pos = tile_rows(positions, tl.program_id(0), tl.program_id(2), T, BT, IS_VARLEN)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_d = o_d < D
    b_y = preactivation(x, weight, bias, o_t, pos, m_t, o_d, m_d, D, W, HAS_BIAS)[0]
    if SILU:
        b_y = b_y * tl.sigmoid(b_y)
    tl.store(y + o_t[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])


@triton.jit
def tile_gradient(
    x, weight, bias, positions, dy, i_b, i_t, T, o_d, m_d, D: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
    SILU: tl.constexpr, HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """Tile i_t along T of row i_b (``tile_rows``'s rows): the gradient on the pre-activation,
    dpre [BT, BD] float32 = dy act'(pre) (pre recomputed from x; zero at rows past T), the shifted
    inputs (``preactivation``), and the rows: their index along T, flat index, mask and position."""
    o_s, o_t, m_t, pos = tile_rows(positions, i_t, i_b, T, BT, IS_VARLEN)
    pre, taps = preactivation(x, weight, bias, o_t, pos, m_t, o_d, m_d, D, W, HAS_BIAS)
    b_dpre = tl.load(dy + o_t[:, None] * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    if SILU:
        s = tl.sigmoid(pre)
        b_dpre = b_dpre * s * (1 + pre * (1 - s))
    return b_dpre, taps, o_s, o_t, m_t, pos


@triton.heuristics(SWITCHES)
@triton.jit
def short_conv_bwd_kernel(
    x, weight, bias, positions, dy, dx, dw_parts, ring, T, tiles_per_program, D: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr, IS_VARLEN: tl.constexpr,
):  # fmt: skip
    """dx [B T, D] = sum_j weight[d, j] dpre[t + W - 1 - j, d] over the rows of t's sequence, with
    dpre = dy act'(pre) (``tile_gradient``), and the program's part of the weight's gradient,
    dw_parts [B, programs along T, D, W + 1] float32 (the bias's in column W).

    Each program walks ``tiles_per_program`` tiles of BT rows back from the end of its segment
    of T, after the tile past it (for the W - 1 rows of dpre that its last rows' dx reads). dpre
    goes through ``ring``, the program's [2 BT, BD] float32 slots (rows modulo 2 BT, so the
    current tile's and the one after it), from which dx reads it shifted by rows: it stays in L2,
    where a float32 dpre through memory between two kernels cost a round trip of 8 bytes an
    element. The weight's gradient is summed in registers over the walk and reduced over rows
    once at the end."""
    i_s, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_s = tl.num_programs(0)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    o_c = tl.arange(0, BD)
    ring += ((i_b * tl.num_programs(1) + i_d) * n_s + i_s).to(tl.int64) * (2 * BT * BD)
    first_tile = i_s * tiles_per_program
    first_row = first_tile * BT
    b_dpre, _, o_s, _, _, _ = tile_gradient(x, weight, bias, positions, dy, i_b, first_tile + tiles_per_program, T,
                                            o_d, m_d, D, W, BT, SILU, HAS_BIAS, IS_VARLEN)  # fmt: skip
    tl.store(ring + ((o_s - first_row) % (2 * BT))[:, None] * BD + o_c[None, :], b_dpre)
    dw = ()
    for j in tl.static_range(W + 1):
        dw = dw + (tl.zeros([BT, BD], dtype=tl.float32),)
    for i in range(tiles_per_program):
        b_dpre, taps, o_s, o_t, m_t, pos = tile_gradient(x, weight, bias, positions, dy, i_b,
                                                         first_tile + tiles_per_program - 1 - i, T, o_d, m_d, D, W,
                                                         BT, SILU, HAS_BIAS, IS_VARLEN)  # fmt: skip
        summed = ()
        for j in tl.static_range(W):
            summed = summed + (dw[j] + b_dpre * taps[j],)
        dw = summed + (dw[W] + b_dpre,)
        # the slots this tile takes held the rows that the previous step's dx read: all must be read
        tl.debug_barrier()
        tl.store(ring + ((o_s - first_row) % (2 * BT))[:, None] * BD + o_c[None, :], b_dpre)
        tl.debug_barrier()
        b_dx = tl.zeros([BT, BD], dtype=tl.float32)
        for j in tl.static_range(W):
            ahead = W - 1 - j
            # row t + ahead took x[t] through tap j if it lies in t's sequence, ahead rows into it
            if IS_VARLEN:  # one packed row of T: o_s is the row along it
                m_a = m_t & (o_s + ahead < T)
                same = m_a & (tl.load(positions + o_t + ahead, mask=m_a, other=0) >= ahead)
            else:
                same = m_t & (pos + ahead < T)
            rows = (o_s + ahead - first_row) % (2 * BT)
            b_a = tl.load(ring + rows[:, None] * BD + o_c[None, :], mask=same[:, None], other=0.0)
            b_dx += tl.load(weight + o_d * W + j, mask=m_d, other=0.0).to(tl.float32)[None, :] * b_a
        tl.store(dx + o_t[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m_t[:, None] & m_d[None, :])
    parts = dw_parts + (i_b * n_s + i_s).to(tl.int64) * D * (W + 1) + o_d * (W + 1)
    for j in tl.static_range(W):
        tl.store(parts + j, tl.sum(dw[j], 0), mask=m_d)
    if HAS_BIAS:
        tl.store(parts + W, tl.sum(dw[W], 0), mask=m_d)


SHORT_CONV_FWD = CompiledLauncher(short_conv_fwd_kernel)
SHORT_CONV_BWD = CompiledLauncher(short_conv_bwd_kernel)
# tiles and warps, best measured at [4, 8192, 1024] bf16 on an H200 (benchmarks/NOTES.md, session
# 22): the forward on [16, 128] tiles in 2 warps, 55.7 us (69.2 on [64, 64] in 4); the backward
# on [16, 64] in 2, walking up to 32 tiles a program, 176 us with the weight's gradient summed
# (305 for session 19's two kernels with a float32 dpre between them)
FWD_BT, FWD_BD, FWD_WARPS = 16, 128, 2
BWD_BT, BWD_BD, BWD_WARPS, BWD_TILES = 16, 64, 2, 32


class ShortConvolutionFunction(torch.autograd.Function):
    """``short_convolution``: forward and backward in our kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, positions, T, silu):
        B, _, D = x.shape
        W = weight.shape[-1]
        BD = min(FWD_BD, next_power_of_2(D))
        y = torch.empty_like(x)
        if x.numel() > 0:
            with on_device_of(x):
                SHORT_CONV_FWD.launch(
                    (cdiv(T, FWD_BT), cdiv(D, BD), B), x, weight, bias, positions, y, T,
                    D=D, W=W, BT=FWD_BT, BD=BD, SILU=silu, num_warps=FWD_WARPS,
                )  # fmt: skip
        ctx.save_for_backward(x, weight, bias, positions)
        ctx.silu = silu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, positions = ctx.saved_tensors
        B, T, D = x.shape
        W = weight.shape[-1]
        BD = min(BWD_BD, next_power_of_2(D))
        tiles_per_program = max(1, min(BWD_TILES, cdiv(T, BWD_BT)))
        grid = (cdiv(T, BWD_BT * tiles_per_program), cdiv(D, BD), B)
        # every part is written where x has elements (else there are none, or no channels)
        dw_parts = torch.empty(B * grid[0], D, W + 1, dtype=torch.float32, device=x.device)
        ring = torch.empty(grid[0] * grid[1] * B, 2 * BWD_BT, BD, dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x)
        if x.numel() > 0:
            with on_device_of(x):
                SHORT_CONV_BWD.launch(
                    grid, x, weight, bias, positions, dy.contiguous(), dx, dw_parts, ring, T, tiles_per_program,
                    D=D, W=W, BT=BWD_BT, BD=BD, SILU=ctx.silu, num_warps=BWD_WARPS,
                )  # fmt: skip
        dw = dw_parts.sum(0)
        db = None if bias is None else dw[:, W].to(bias.dtype)
        return dx, dw[:, :W].to(weight.dtype), db, None, None, None


@tensor_cache
def sequence_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Each token's position in its sequence, ``[T]`` int32, for the sequences of ``cu_seqlens``
    ``[N + 1]``: FLA's ``prepare_position_ids`` cast once per ``cu_seqlens`` tensor, not in every
    layer's call."""
    return prepare_position_ids(cu_seqlens).to(torch.int32)


@torch.compiler.disable
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

    The backward is one kernel: it recomputes the pre-activation, passes its gradient to the
    input's through a small ring of float32 rows per program that stays in L2, and sums the
    weight's gradient in registers. FLA's recomputes the pre-activation in a forward of its own
    and its SiLU once per tap. At [4, 8192, 1024] bf16 on an H200 (benchmarks/NOTES.md, session
    22) the forward takes 55.7 us and the backward 176, and the 340M model's training step 189.5
    ms against 192.7 with session 19's backward (two kernels with a float32 dpre between them,
    305 us), which had taken 211.9 ms against FLA's 214.4 in that session's step."""
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
        x: ``[B, T, D]`` or ``[B, T, H, D / H]`` (B = 1 with ``cu_seqlens``).
        residual: optional ``[B, T, D]`` added to the output.
        mask: optional ``[B, T]`` 0/1 padding mask; padded inputs count as zeros.
        cache: optional ``[N, D, W]``: the last W inputs of every sequence (newest last); calls
            of one token a sequence without autograd update it in place, as FLA's do.
        output_final_state: whether to return the updated cache.
        cu_seqlens: optional ``[N + 1]`` offsets of sequences packed along T.

    Returns:
        ``y`` in the shape of ``x`` and the cache ``[N, D, W]`` (None unless ``output_final_state``).
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
        shape = x.shape
        x = x.flatten(2)  # FLA takes [B, T, H, d] too, as [B, T, H * d]
        if mask is not None:
            if cu_seqlens is not None:
                raise ValueError("`mask` and `cu_seqlens` cannot be provided at the same time")
            x = x * mask[..., None].to(x.dtype)
        if cu_seqlens is None:
            lengths = [x.shape[1]]
            y, final_state = self._convolve(x, cache)
        else:
            offsets = host_offsets(cu_seqlens, x.shape[1])
            spans = list(zip(offsets[:-1], offsets[1:]))
            lengths = [eos - bos for bos, eos in spans]
            pieces = [
                self._convolve(x[:, bos:eos], None if cache is None else cache[i : i + 1])
                for i, (bos, eos) in enumerate(spans)
            ]
            y = torch.cat([p[0] for p in pieces], dim=1)
            final_state = torch.cat([p[1] for p in pieces], dim=0)
        if cache is not None and not torch.is_grad_enabled() and all(n == 1 for n in lengths):
            # as FLA's step: a call of one token a sequence without autograd updates the cache in
            # place (torch lets only inference mode write a cache made under torch.inference_mode();
            # FLA's kernels write it regardless)
            with torch.inference_mode(cache.is_inference()):
                final_state = cache.copy_(final_state)
        y = y.reshape(shape)
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
