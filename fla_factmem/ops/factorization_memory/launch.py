"""Host side of the Triton kernels: shapes, block sizes and launches."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from fla.ops.utils import prepare_chunk_indices, prepare_chunk_offsets

from fla_factmem.ops.compiled_launch import CompiledLauncher, KeptKernel, is_interpreted, launch_kept
from fla_factmem.ops.factorization_memory.chunk_bwd_kernels import (
    chunk_bwd_dominant_kernel,
    chunk_bwd_dqk_kernel,
    chunk_bwd_dqk_walk_kernel,
    chunk_bwd_dv_kernel,
)
from fla_factmem.ops.factorization_memory.chunk_kernels import (
    chunk_fwd_o_kernel,
    chunk_state_increment_kernel,
    chunk_state_scan_kernel,
    chunk_state_walk_kernel,
    logsumexp_kernel,
)
from fla_factmem.ops.factorization_memory.chunk_sparse_kernels import (
    chunk_sparse_bwd_kernel,
    chunk_sparse_fwd_kernel,
    sparse_events_kernel,
    sparse_keys_kernel,
    sum_over_picks_kernel,
)
from fla_factmem.ops.factorization_memory.fused_recurrent_kernels import (
    fused_recurrent_fwd_kernel,
    fused_recurrent_sparse_fwd_kernel,
)
from fla_factmem.ops.factorization_memory.routing import DENSE_TRITON_MAX_M, SparseRouting
from fla_factmem.ops.factorization_memory.routing_kernels import sparse_routing_bwd_kernel, sparse_routing_kernel
from fla_factmem.utils import cdiv, next_power_of_2, warn_once

# BT: tokens per chunk. 32 measured faster than 64 on an H100 (benchmarks/ops/NOTES.md): the
# [BT, BT] tiles of the intra-chunk pairs stay small, at twice the chunk states' traffic.
CHUNK = 32
LEVELS = CHUNK.bit_length() - 1  # levels of intra-chunk pairs (chunk_kernels.py)

# The dense op's launches go past Triton's JIT dispatch, as the sparse op's do (CompiledLauncher):
# through the JIT its 9 launches per forward+backward took 0.87 ms of host time at M=64, near its
# kernels' 1.03 ms, and 0.28 ms kept (B=4, T=4096, H=8, V=64, bf16, H200, benchmarks/ops/NOTES.md,
# session 34)
LOGSUMEXP = CompiledLauncher(logsumexp_kernel)
STATE_INCREMENT = CompiledLauncher(chunk_state_increment_kernel)
STATE_SCAN = CompiledLauncher(chunk_state_scan_kernel)
STATE_WALK = CompiledLauncher(chunk_state_walk_kernel)
FWD_O = CompiledLauncher(chunk_fwd_o_kernel)
BWD_DOMINANT = CompiledLauncher(chunk_bwd_dominant_kernel)
BWD_DQK = CompiledLauncher(chunk_bwd_dqk_kernel)
BWD_DQK_WALK = CompiledLauncher(chunk_bwd_dqk_walk_kernel)
BWD_DV = CompiledLauncher(chunk_bwd_dv_kernel)


def num_sequences(B: int, cu_seqlens: torch.Tensor | None) -> int:
    """N: the batch's rows, or the sequences packed along T."""
    return B if cu_seqlens is None else cu_seqlens.numel() - 1


def dot_block(n: int, limit: int) -> int:
    """A block over a dimension of size n that a ``tl.dot`` contracts: n's power of 2, at most
    ``limit``, but at least 16 whatever ``limit``: Triton 3.6 compiles no smaller contraction of
    32-bit operands for NVIDIA GPUs (at M or V of 8 or less the dense kernels failed to compile
    for sm_90). Masks cover the padding."""
    return max(16, min(next_power_of_2(n), limit))


# Columns of V per step of the dq/dk kernel's loop: 16, ``dot_block``'s least, so that its [BV, BM]
# tiles of the chunk states stay small in registers. Measured on an H200 (bf16, B=4, T=4096, H=8,
# V=64, M=256): the backward took 2.62 ms with 16 or 32 columns at blocks of 32 rows in 2 warps,
# and at blocks of 16 rows in 2 warps 2.86 ms with 16 against 3.08 with 32 (benchmarks/ops/NOTES.md,
# session 32). The dv kernel keeps whole rows: blocks of V there recompute its gates per block
# (2.5 ms against 1.1 ms at V = 256).
DQK_BLOCK_V = 16

# The dq/dk kernel's two forms: at small V a walk through each chunk token by token, element-wise
# in float32 over [BM, V] tiles, whose work grows with M * V per token; else the levels, whose
# matrix products grow more slowly with V (chunk_bwd_kernels.py). Measured on an H200 (B=4,
# T=4096, H=8, kernels' forward+backward, benchmarks/ops/NOTES.md, session 39): bf16 at M=256,
# V=64 2538 us walking (as launched here) against 2902 by levels; the walk without the cap, 2003
# against 2543 at V = 32 and 873 against 933 at M=64; float32 inputs 4768 against 9863 (M=256,
# V=64, the walk capped, without its prefetch, which was timed in bf16 only). Session 40, as
# launched here: fp16 at M=256 2899 against 3158 and at M=64 935 against 1010; bf16 at M=128 1407
# against 1593 and at B=1, T=16384, H=4 1739 against 1923; but the walk loses above V = 64, at
# B=4, T=8192, H=4, M=256: V=128 7866 against 4367 by levels and V=256 15785 against 7087.
DQK_WALK_MAX_V = 64
# The walk's register cap: at 128, 16 warps share an SM instead of 12, and their loads' latency
# hides better. H200, bf16, M=256, V=64: 2538 against 2620 us capped and not (without the
# prefetch: 2778 against 2987); float32 inputs, without the prefetch, 4768 against 4998. Compiled
# for sm_90a (M=256, V=64, session 40), as launched: bf16 states 12 bytes of spills (2 local loads
# and 2 stores a forward step; 157 registers uncapped), float32 states 24 bytes (167 uncapped);
# without the prefetch 125 registers and no spills, and 4 bytes for float32
WALK_MAX_REGISTERS = 128


def dqk_walks(V: int) -> bool:
    """Whether the dense backward's dq/dk kernel walks its chunks token by token (at V <= 64)
    rather than by levels."""
    return V <= DQK_WALK_MAX_V


def walk_slices(BV: int, state_bytes: int) -> int:
    """Slices of the dq/dk walk's columns (``chunk_bwd_dqk_walk_kernel``): 128 bytes of chunk
    states a row and slice, so that 8 threads of 16-byte loads share each row, as they do for
    bf16 states at V = 64; where 16 threads shared a row of float32 states, each sum over V took
    one more round of shuffles and each row's gates were formed in twice the threads. Up to
    ``DQK_WALK_MAX_V`` that is 1 slice, or 2 for float32 states above V = 32; more only where the
    walk is forced. Chosen from compiled instruction counts (benchmarks/ops/NOTES.md, session 39);
    timed only for float32 inputs on an H200 (M=256, V=64, the walk without its prefetch or
    register cap): 4998 us forward+backward with 2 slices against 5115 with 1."""
    return max(1, BV * state_bytes // 128)


class ChunkLayout(NamedTuple):
    """How the sequences split into chunks: NT chunks per sequence (equal lengths), or the
    chunk_indices [NT_total, 2] and chunk_offsets [N + 1] of FLA for packed sequences."""

    NT: int
    NT_total: int
    chunk_indices: torch.Tensor | None
    chunk_offsets: torch.Tensor | None


def chunk_layout(B: int, T: int, cu_seqlens: torch.Tensor | None) -> ChunkLayout:
    """The chunks of B sequences of T tokens, or of the packed sequences of ``cu_seqlens`` [N + 1]."""
    if cu_seqlens is None:
        NT = cdiv(T, CHUNK)
        return ChunkLayout(NT, B * NT, None, None)
    # FLA's helpers, cached per cu_seqlens tensor; counting the chunks reads the lengths on the host once
    chunk_indices = prepare_chunk_indices(cu_seqlens, CHUNK)
    return ChunkLayout(0, chunk_indices.shape[0], chunk_indices, prepare_chunk_offsets(cu_seqlens, CHUNK))


# whether Triton interprets the kernels (all defined under the same TRITON_INTERPRET)
INTERPRETED = is_interpreted(chunk_fwd_o_kernel)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots; bf16/fp16 inputs get tf32 (and bf16 operands in the
    intra-chunk levels' products: ``chunk_kernels.level_product``). Interpreted kernels get exact
    fp32 dots for every dtype: the interpreter multiplies the bit patterns of bf16 operands
    (triton-lang/triton#11584)."""
    return "ieee" if dtype == torch.float32 or INTERPRETED else "tf32"


@functools.cache
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def walk_fills_gpu(programs: int, x: torch.Tensor, cu_seqlens: torch.Tensor | None, reverse: bool) -> bool:
    """Whether ``chunk_state_walk_kernel``'s one pass beats the increments and the scan, which
    write and read every chunk's increment once more: where its programs, one per block of the
    state of each sequence and head, are at least 3 per SM, and in reverse only up to 64 columns.
    Timed on an H200 (benchmarks/ops/NOTES.md, session 36, bf16, against the two kernels, forward /
    reverse): B=4, T=4096, H=8, V=64, M=256 (512 programs, 3.9 per SM) -13 / -50 us; M=128 (1.9
    per SM) +63 / +31 us; B=4, T=8192, H=4, V=256, M=256 (7.8 per SM) -81 / +281 us. Packed
    sequences keep the two kernels: the walk lasts as long as the longest sequence, however many
    short ones fill the grid. So do interpreted kernels."""
    if cu_seqlens is not None or x.device.type != "cuda" or INTERPRETED:
        return False
    if reverse and x.shape[-1] > 64:
        return False
    return programs >= 3 * multiprocessor_count(x.device.index)


def chunk_state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the chunk states the dense op keeps between its kernels: bf16 for bf16 inputs
    (as FLA keeps its chunk states in the inputs' dtype), which halves what the backward saves
    and what every kernel after the scan reads; float32 for the others. Not fp16: the gradient
    states grow to about |do| mu / eta and left fp16's range under loss scaling (NaN gradients)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def logsumexp(logits: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``[B, T, H, M]`` logits and ``[B, T, H]`` eta -> the float32 log-sum-exp over M
    in two parts, ``[B, T, H, 2]`` (see ``logsumexp_kernel``), and the int32 dominant row
    (theta > 1/2, or -1), ``[B, T, H]``."""
    M = logits.shape[-1]
    lse = torch.empty(*logits.shape[:-1], 2, dtype=torch.float32, device=logits.device)
    dominant = torch.empty(logits.shape[:-1], dtype=torch.int32, device=logits.device)
    n_rows = dominant.numel()
    BR = 16
    LOGSUMEXP.launch((cdiv(n_rows, BR),), logits, eta, lse, dominant, n_rows, M=M, BR=BR, BM=next_power_of_2(M))
    return lse, dominant


def memory_copy(initial_state: torch.Tensor | None, N: int, H: int, M: int, V: int, device) -> torch.Tensor:
    """A contiguous float32 ``[N, H, M, V]`` copy of the initial state (zeros if None), for the
    sparse kernels to update in place."""
    if initial_state is None:
        return torch.zeros(N, H, M, V, dtype=torch.float32, device=device)
    return initial_state.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _check_dense_m(M: int) -> None:
    if M > DENSE_TRITON_MAX_M:
        raise ValueError(f"the dense Triton kernels take M <= {DENSE_TRITON_MAX_M}; got M = {M}")


def _prepare(v, logits, eta, mu, initial_state, cu_seqlens):
    """Checks M and makes the dense chunk kernels' inputs contiguous: ``(v, logits, eta, mu, h0,
    N)``, N sequences."""
    _check_dense_m(logits.shape[-1])
    N = num_sequences(v.shape[0], cu_seqlens)
    h0 = initial_state.contiguous() if initial_state is not None else None
    return (*(x.contiguous() for x in (v, logits, eta, mu)), h0, N)


def stride_unit(stride: int) -> int:
    """The largest power of 2, at most 16, that divides ``stride`` (16 for 0). Kernels take a
    stride in these units (a constexpr) so that the compiler knows how the rows it points to are
    aligned: of an int argument it only knows whether 16 divides it. With the logits as views into
    the layer's input projection (6152 elements a token at the 340M model's shape), the sparse
    decode kernel took 7.4 us a step without this and 5.4 with it, 5.3 on contiguous logits (H200)."""
    return min(16, stride & -stride) if stride else 16


def token_stride(x: torch.Tensor) -> int | None:
    """The stride, in elements, at which the tokens of ``x`` ``[B, T, H, X]`` or ``[B, T, H]``
    lie where kernels that take a stride per token can read ``x`` in place: each token's heads
    (and each head's X) packed and the tokens at one stride (a slice of a fused projection's
    output, or eta and mu unbound from one ``[B, T, 2, H]`` tensor). None where they cannot."""
    B, T, H = x.shape[:3]
    X = x.shape[3] if x.dim() == 4 else 1
    if not ((X == 1 or x.stride(-1) == 1) and (H == 1 or x.stride(2) == X)):
        return None
    if T == 1:
        return x.stride(0)
    if B == 1 or x.stride(0) == T * x.stride(1):
        return x.stride(1)
    return None


def token_strided(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` as kernels that take a stride per token read it, and that stride in elements: ``x``
    itself where ``token_stride`` finds one, a contiguous copy otherwise."""
    stride = token_stride(x)
    if stride is None:
        return x.contiguous(), x.shape[2] * (x.shape[3] if x.dim() == 4 else 1)
    return x, stride


def chunk_states(
    x: torch.Tensor,
    logits: torch.Tensor,
    lse: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    start: torch.Tensor | None,
    store_end: bool,
    layout: ChunkLayout,
    cu_seqlens: torch.Tensor | None,
    N: int,
    reverse: bool,
    walk: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-chunk states ``[NT_total, H, M, V]`` in ``chunk_state_dtype(x.dtype)`` and the state at
    the far end ``[N, H, M, V]`` float32.

    Forward (``x = v``, ``start`` = initial state): the memory at each chunk's start, and the
    final state. ``reverse`` (``x = do``, ``start`` = gradient on the final state): the gradient
    on the memory at each chunk's end from the tokens after it, and the gradient on the
    initial state. ``walk`` picks the one-pass walk (True) or the increments and the scan
    (False); None lets ``walk_fills_gpu`` choose.
    """
    _, T, H, V = x.shape
    M = logits.shape[-1]
    dtype = chunk_state_dtype(x.dtype)
    end = torch.empty(N, H, M, V, dtype=torch.float32, device=x.device) if store_end else None
    # the walk's exact float32 dots run on the FMA units: with 64 columns they spilled 504 bytes
    # (compiled for sm_90a, session 35), with 32 none
    BM, BV = min(next_power_of_2(M), 16), min(next_power_of_2(V), 32 if x.dtype == torch.float32 else 64)
    grid = (cdiv(M, BM) * cdiv(V, BV), N, H)
    if walk is None:
        walk = walk_fills_gpu(grid[0] * N * H, x, cu_seqlens, reverse)
    if walk:
        states = torch.empty(layout.NT_total, H, M, V, dtype=dtype, device=x.device)
        STATE_WALK.launch(
            grid,
            x, logits, lse, eta, mu, states, start, end, layout.chunk_offsets, cu_seqlens, T, layout.NT,
            H=H, M=M, V=V, BT=CHUNK, BM=BM, BV=BV, REVERSE=reverse, DOT_PRECISION=dot_precision(x.dtype),
            num_warps=2,
        )  # fmt: skip
        return states, end
    increments = torch.empty(layout.NT_total, H, M, V, dtype=torch.float32, device=x.device)
    decays = torch.empty(layout.NT_total, H, M, dtype=torch.float32, device=x.device)
    BM, BV = min(next_power_of_2(M), 64), min(next_power_of_2(V), 64)
    grid = (cdiv(M, BM) * cdiv(V, BV), layout.NT_total, H)
    # 2 warps, measured on an H200 (benchmarks/ops/NOTES.md, session 33): with the scan after them,
    # 0.82-0.95x the time of 4 warps, both directions, at M=64 and 256 and one sequence of 4 heads
    STATE_INCREMENT.launch(
        grid,
        x, logits, lse, eta, mu, increments, decays, layout.chunk_indices, cu_seqlens,
        T, layout.NT, H=H, M=M, V=V, BT=CHUNK, BM=BM, BV=BV, GRAD=reverse,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=2,
    )  # fmt: skip
    # only the stored states are rounded: the increments, the scan over chunks, every sum and the
    # far end stay float32, and the kernels widen the states as they load them (their products
    # in tf32, as before); float32 states overwrite the increments
    states = increments if dtype == torch.float32 else torch.empty_like(increments, dtype=dtype)
    BM, BV = min(next_power_of_2(M), 16), min(next_power_of_2(V), 32)
    grid = (cdiv(M, BM) * cdiv(V, BV), N, H)
    STATE_SCAN.launch(
        grid,
        increments, decays, states, start, end, layout.chunk_offsets, cu_seqlens, layout.NT,
        H=H, M=M, V=V, BM=BM, BV=BV, REVERSE=reverse, num_warps=2,
    )  # fmt: skip
    return states, end


class SavedForBackward(NamedTuple):
    """What the dense forward keeps for the backward (``chunk_fwd``): per token the log-sum-exp
    ``lse`` [B, T, H, 2] float32 (the largest logit, and log sum_j exp(logit_j - largest)), the
    ``dominant`` row [B, T, H] int32 (theta > 1/2, else -1); the memory at every chunk's start
    ``states`` [NT_total, H, M, V] (``chunk_state_dtype``); the intra-chunk ``scores``
    [B, T, H, 32] float32, None without a backward to come; and the chunks' ``layout``."""

    lse: torch.Tensor
    dominant: torch.Tensor
    states: torch.Tensor
    scores: torch.Tensor | None
    layout: ChunkLayout


def chunk_fwd(
    v: torch.Tensor,
    logits: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    store_scores: bool = True,
    block_m: int | None = None,
    num_warps: int | None = None,
    state_walk: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, SavedForBackward]:
    """Dense forward. Shapes as in ``chunk_factorization_memory``; returns ``(o, final state or
    None, what the backward needs)``; without ``store_scores`` (no backward will run) the saved
    scores are None. ``block_m`` and ``num_warps`` set the output kernel's launch (for tuning:
    ``benchmarks/ops/sweep_launch_configs.py``); ``state_walk`` the way to the chunk states
    (``chunk_states``' ``walk``)."""
    B, T, H, V = v.shape
    M = logits.shape[-1]
    v, logits, eta, mu, h0, N = _prepare(v, logits, eta, mu, initial_state, cu_seqlens)
    lse, dominant = logsumexp(logits, eta)
    layout = chunk_layout(B, T, cu_seqlens)
    states, ht = chunk_states(
        v, logits, lse, eta, mu, h0, output_final_state, layout, cu_seqlens, N, reverse=False, walk=state_walk
    )

    # blocks of 16 rows in 1 warp since the levels' factors come from one scan (session 45, H100, bf16,
    # B=4 T=4096 H=8 V=64: forward 0.48 against 0.55 ms at M=256 with 32 rows in 2 warps, the best
    # before it; benchmarks/ops/NOTES.md)
    BM = dot_block(M, block_m or 16)
    BV = min(next_power_of_2(V), 64)
    o = torch.empty_like(v)
    # the intra-chunk scores, [B, T, H, CHUNK] float32: the backward's dv reads them back
    scores = torch.empty(*v.shape[:-1], CHUNK, dtype=torch.float32, device=v.device) if store_scores else None
    FWD_O.launch(
        (layout.NT_total, H, cdiv(V, BV)),
        v, logits, lse, eta, mu, states, o, scores, layout.chunk_indices, cu_seqlens,
        T, layout.NT, H=H, M=M, V=V, BT=CHUNK, LEVELS=LEVELS, BM=BM, BV=BV,
        DOT_PRECISION=dot_precision(v.dtype), STORE_SCORES=store_scores, num_warps=num_warps or 1,
    )  # fmt: skip
    return o, ht, SavedForBackward(lse, dominant, states, scores, layout)


def top_k_group(BM: int, KB: int) -> int:
    """Logits per group of the grouped top-K (``routing_kernels.top_k_logits``): the power of 2
    nearest below sqrt(BM / KB), which balances the BM / G group maxima against the KB * G
    candidates; 1 (no groups) where that would leave fewer than 2 KB groups."""
    ratio = BM // KB
    return 1 if ratio < 4 else 1 << (ratio.bit_length() - 1) // 2


def logits_per_warp(dtype: torch.dtype, M: int) -> int:
    """Logits one warp ranks at a time in the top-K search: 4096 where the ranking keys
    (``routing_kernels.ranking_keys``) take 32 bits (16-bit logits of at most 2^16 rows), 2048
    where they take 64; some 128 registers a thread either way."""
    return 4096 if dtype.itemsize == 2 and M <= 2**16 else 2048


def top_k_warps(dtype: torch.dtype, M: int, rows: int = 1) -> int:
    """Warps of a program that ranks ``rows`` tokens' M logits (at most 32)."""
    return min(32, max(1, rows * next_power_of_2(M) // logits_per_warp(dtype, M)))


def sparse_routing(logits: torch.Tensor, topk: int) -> SparseRouting:
    """The sparse variant's routing in one pass over the logits, no autograd: each token's top
    ``topk`` rows (int32, largest logit first) and their alpha (float32, the softmax
    re-normalised over them), ``[B, T, H, topk]`` each, from ``[B, T, H, M]`` logits (read where
    they lie if each token's heads are packed, as in ``token_strided``)."""
    B, T, H, M = logits.shape
    logits, stride_logits = token_strided(logits)
    unit = stride_unit(stride_logits)
    rows = torch.empty(B, T, H, topk, dtype=torch.int32, device=logits.device)
    alpha = torch.empty(B, T, H, topk, dtype=torch.float32, device=logits.device)
    BM, KB = next_power_of_2(M), next_power_of_2(topk)
    # best measured on an H200 (benchmarks/ops/NOTES.md): up to 4 rows of at most 4K logits per
    # program in one warp (half as many with float32 logits, whose ranking keys take 64 bits),
    # so that the K reductions stay within a warp
    BR = max(1, min(4, logits_per_warp(logits.dtype, M) // BM))
    n_rows = B * T * H
    SPARSE_ROUTING.launch(
        (cdiv(n_rows, BR),),
        logits, rows, alpha, n_rows, stride_logits // unit, LOGITS_UNIT=unit, H=H, M=M, K=topk, BR=BR, BM=BM, KB=KB,
        G=top_k_group(BM, KB),
        num_warps=top_k_warps(logits.dtype, M, BR),
    )  # fmt: skip
    return SparseRouting(rows, alpha)


class SparseEvents(NamedTuple):
    """Each token's K picks as events along the memory's rows (``sparse_events``). ``rows`` and
    ``alpha``: the routing's picks ``[B, T, H, K]`` (int32, float32) as they came, for the
    routing backward. Per head, sorted by key (sequence * M + row) and stably in token order
    within a row, all ``[H, E]`` with E = B T K: ``keys`` (int32: the key shifted left by 2,
    bit 0 set where the event starts its row's run, bit 1 where it ends it), ``picks`` (each event's
    flat index into ``[B, T, H, K]``, int32), ``theta`` and ``phi`` (float32).
    ``block_bounds`` ``[H, NB + 1]`` int32: where each program's block of rows starts among the
    events (at a row's start, or at a tile inside a row that it splits). About 24 bytes per pick
    in all: what the sparse backward keeps besides the inputs."""

    rows: torch.Tensor
    alpha: torch.Tensor
    keys: torch.Tensor
    picks: torch.Tensor
    theta: torch.Tensor
    phi: torch.Tensor
    block_bounds: torch.Tensor


# Launch of the sparse kernels: tiles of 8 events in one warp, blocks of about 256 events. At the
# 340M model's shape (B=4, T=8192, H=4, V=256, (1024, 16), bf16, H200, session 20) the op took
# 2.358 ms of kernels a forward+backward with tiles of 8 and 2.410 with tiles of 4 (carries twice
# as many; backward 885 against 957 us, forward 618 against 494); blocks of 256 events since
# session 7, rows split between blocks since session 21, when the deeper layers of that model
# held rows of up to 1798 events (benchmarks/ops/NOTES.md).
SPARSE_TILE = 8
# The kernels read whole tiles of events without a mask, aligned among a head's events: up to
# SPARSE_TILE - 1 elements past its last event, and one before its first (an empty block's
# flags). The event arrays lie this many elements inside their buffers, at both ends (from when a
# forward read a tile ahead: more than the kernels need now, harmless and cheap)
EVENT_PADDING = 2 * SPARSE_TILE
# Columns per program: all of V up to 256, 8 a thread, so that the events' scalar work (keys,
# picks, addresses, masks) is done once per row. At the 340M model's V = 256 (B=4, T=8192, H=4,
# (1024, 16), bf16, H200, session 20) the forward went 555 -> 494 us and the backward 1456 -> 957
# from 128 and 64 columns, and the model's training step 210.2 -> 195.2 ms in turns.
SPARSE_BLOCK_V = 256
SPARSE_WARPS = 1
SPARSE_EVENTS_PER_PROGRAM = 256

# The sparse op's launches go past Triton's JIT dispatch (CompiledLauncher): at (1024, 16), B=4,
# T=4096, H=8, V=64 its host time (1.69 ms per forward+backward, 7 launches through the JIT)
# exceeded its kernels' 1.45 ms on an H200 (benchmarks/ops/NOTES.md).
SPARSE_ROUTING = CompiledLauncher(sparse_routing_kernel)
SPARSE_KEYS = CompiledLauncher(sparse_keys_kernel)
SPARSE_EVENTS = CompiledLauncher(sparse_events_kernel)
SUM_OVER_PICKS = CompiledLauncher(sum_over_picks_kernel)
SPARSE_FWD = CompiledLauncher(chunk_sparse_fwd_kernel)
SPARSE_BWD = CompiledLauncher(chunk_sparse_bwd_kernel)
SPARSE_ROUTING_BWD = CompiledLauncher(sparse_routing_bwd_kernel)


def sparse_events(
    routing: SparseRouting, eta: torch.Tensor, mu: torch.Tensor, M: int, cu_seqlens: torch.Tensor | None
) -> SparseEvents:
    """The picks of ``routing`` (rows, alpha ``[B, T, H, K]``) sorted into events along the
    memory's rows, with their theta and phi from ``[B, T, H]`` eta and mu (``SparseEvents``).
    Block j of a head holds the rows that start between the rows holding events j S and
    (j + 1) S, S = ``SPARSE_EVENTS_PER_PROGRAM``: S events and the rest of the row it ends in,
    except that a row holding events (j - 1) S and j S is split at the tile of event j S, so
    that no block holds much more than 2 S events, however often a row is picked (the scans
    chain a split row's pieces, ``chunk_sparse_kernels.py``)."""
    rows, alpha = (x.contiguous() for x in routing)
    B, T, H, K = rows.shape
    N = num_sequences(B, cu_seqlens)
    E = B * T * K
    # one sort for all heads, each head's keys above the previous head's (N + 1 sequences each,
    # for the tokens past the last offset), in token order within a key
    head_keys = (N + 1) * M
    if head_keys > 2**29:
        raise ValueError(
            f"the sparse kernels key rows by sequence * M + row in 29 bits of an int32 (the rest are flags); "
            f"got {N} sequences of M = {M}"
        )
    # the sort's radix passes cover every bit of the keys' dtype: 16-bit keys (from -2^15) where
    # all heads' fit take half the passes of 32-bit ones (100 against 151 us at (1024, 16), H200)
    if H * head_keys <= 2**16:
        key_dtype, lowest_key = torch.int16, -(2**15)
    else:
        key_dtype, lowest_key = (torch.int32 if H * head_keys < 2**31 else torch.int64), 0
    # tokens past the last offset (outside the contract) get keys >= N M, in no block: never computed
    token_sequence = None
    if cu_seqlens is not None:
        tokens = torch.arange(B * T, device=rows.device, dtype=cu_seqlens.dtype)
        token_sequence = torch.searchsorted(cu_seqlens[1:], tokens, right=True)
    keys = torch.empty(H, B * T, K, dtype=key_dtype, device=rows.device)
    BE = 1024
    SPARSE_KEYS.launch(
        (cdiv(H * E, BE),),
        rows, token_sequence, keys, H * E, T, head_keys, lowest_key, H=H, K=K, M=M, BE=BE, num_warps=4,
    )  # fmt: skip
    sorted_keys, order = torch.sort(keys.view(-1), stable=True)
    events = [padded_event_array(H, E, dtype, rows.device) for dtype in (torch.int32,) * 2 + (torch.float32,) * 2]
    NB = cdiv(E, SPARSE_EVENTS_PER_PROGRAM)
    block_bounds = torch.empty(H, NB + 1, dtype=torch.int32, device=rows.device)
    SPARSE_EVENTS.launch(
        (cdiv(H * (NB + 1), BE) + cdiv(H * E, BE),),
        order, sorted_keys, eta.contiguous(), mu.contiguous(), alpha, *events, block_bounds, E, H * E,
        head_keys, lowest_key, N * M, NB, E.bit_length(),
        H=H, K=K, S=SPARSE_EVENTS_PER_PROGRAM, BP=SPARSE_TILE, BE=BE, num_warps=4,
    )  # fmt: skip
    return SparseEvents(rows, alpha, *events, block_bounds)


def padded_event_array(H: int, E: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised ``[H, E]`` event array that lies ``EVENT_PADDING`` elements inside its buffer
    at both ends: the scans' unmasked reads past a head's events land on another head's events or
    on the padding, in lanes they mask."""
    buffer = torch.empty(H * E + 2 * EVENT_PADDING, dtype=dtype, device=device)
    return buffer[EVENT_PADDING : EVENT_PADDING + H * E].view(H, E)


def has_event_padding(x: torch.Tensor) -> bool:
    """Whether the scans may read ``EVENT_PADDING`` elements before and after contiguous ``x``."""
    end = (x.storage_offset() + x.numel() + EVENT_PADDING) * x.element_size()
    return x.is_contiguous() and x.storage_offset() >= EVENT_PADDING and x.untyped_storage().nbytes() >= end


def with_event_padding(events: SparseEvents) -> SparseEvents:
    """``events`` whose keys, picks, theta and phi have the padding the scans read into: copies
    where something dropped it (a saved-tensor hook that moved them, such as
    ``torch.autograd.graph.save_on_cpu``), which says so once."""
    arrays = (events.keys, events.picks, events.theta, events.phi)
    if all(map(has_event_padding, arrays)):
        return events
    warn_once(
        "sparse_events_padding",
        "fla_factmem: the sparse backward copies its saved events into padded buffers (a saved-tensor "
        "hook or a copy dropped the padding the scan kernels read into); this costs a copy per call.",
    )
    padded = [padded_event_array(*x.shape, x.dtype, x.device).copy_(x) for x in arrays]
    return events._replace(keys=padded[0], picks=padded[1], theta=padded[2], phi=padded[3])


def sparse_block_v(V: int) -> int:
    """Columns per program of the sparse kernels: V's power of 2, at most ``SPARSE_BLOCK_V``."""
    return min(next_power_of_2(V), SPARSE_BLOCK_V)


def split_row_pieces(H: int, NB: int, V: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The scans' buffers for the pieces of rows split between blocks: ``[H, NB, V]`` states and
    ``[H, NB]`` decays, float32, written (by a launch with ``SUMMARY``) only where a row is split."""
    return (
        torch.empty(H, NB, V, dtype=torch.float32, device=device),
        torch.empty(H, NB, dtype=torch.float32, device=device),
    )


def sum_over_picks(x: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    """``[tokens, H, K, V]`` per-pick terms -> their sum over K (added in float32) in ``dtype``,
    viewed as ``shape`` (``[B, T, H, V]``)."""
    *_, K, V = x.shape
    n_rows = x.numel() // (K * V)
    y = torch.empty(shape, dtype=dtype, device=x.device)
    # one warp on 2048 terms at a time: best measured on an H200 at (1024, 16), V=64, 75 us on
    # bf16 terms (300 us with 4 warps on 4096), 137 us on float32 terms (either launch)
    BV, KB = min(next_power_of_2(V), 64), min(next_power_of_2(K), 16)
    BR = max(1, 2048 // (KB * BV))
    SUM_OVER_PICKS.launch((cdiv(n_rows, BR), cdiv(V, BV)), x, y, n_rows, K=K, V=V, BR=BR, KB=KB, BV=BV, num_warps=1)
    return y


def chunk_sparse_fwd(
    v: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    routing: SparseRouting,
    M: int,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    store_carries: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, SparseEvents, torch.Tensor | None]:
    """Sparse forward over each token's K picks (``routing``, rows < M, e.g. from
    ``sparse_routing``), with ``[B, T, H]`` eta and mu: ``(o [B, T, H, V] in v's dtype, final
    state [N, H, M, V] float32 or None, the events and the carries for the backward)``. The
    carries, the memory entering each tile of ``SPARSE_TILE`` events (``[H, cdiv(B T K,
    SPARSE_TILE), V]`` float32, T K V / SPARSE_TILE values per head), are stored if ``store_carries``,
    else None. Rows no token picks are never read or written (the final state's are copies of
    the initial state's). Besides o it allocates the picks' terms of o, ``[B T, H, K, V]`` in
    v's dtype, for as long as it runs."""
    B, T, H, V = v.shape
    K = routing.rows.shape[-1]
    N = num_sequences(B, cu_seqlens)
    v = v.contiguous()
    h0 = initial_state.contiguous() if initial_state is not None else None
    events = sparse_events(routing, eta, mu, M, cu_seqlens)
    E = events.keys.shape[1]
    ht = memory_copy(h0, N, H, M, V, v.device) if output_final_state else None
    # in v's dtype: each term rounds once before the sum, for half the traffic of float32 terms
    # in bf16 (this buffer, written and read once each way, is the largest traffic of the op)
    contributions = torch.empty(B * T, H, K, V, dtype=v.dtype, device=v.device)
    NTILES = cdiv(E, SPARSE_TILE)
    carries = torch.empty(H, NTILES, V, dtype=torch.float32, device=v.device) if store_carries else None
    BV = sparse_block_v(V)
    NB = events.block_bounds.shape[1] - 1
    pieces = split_row_pieces(H, NB, V, v.device)
    for summary in (True, False):
        SPARSE_FWD.launch(
            (NB, H, cdiv(V, BV)),
            v, events.keys, events.picks, events.theta, events.phi, events.block_bounds, h0, ht, contributions,
            carries, *pieces, E, NB, NTILES,
            H=H, M=M, K=K, V=V, BP=SPARSE_TILE, BV=BV, SUMMARY=summary, num_warps=SPARSE_WARPS,
        )  # fmt: skip
    o = sum_over_picks(contributions, v.dtype, v.shape)
    return o, ht, events, carries


def chunk_sparse_bwd(
    v: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    M: int,
    logits_dtype: torch.dtype,
    events: SparseEvents,
    carries: torch.Tensor,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    needs_dh0: bool,
    picks_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sparse backward from the forward's inputs (``initial_state`` among them), ``events`` and
    ``carries`` (``chunk_sparse_fwd``'s, one per tile of ``SPARSE_TILE`` events), over the same
    tiles: ``(dv, dlogits, deta, dmu, dh0)`` in the layouts and dtypes of the inputs (dlogits
    ``[B, T, H, M]`` in ``logits_dtype``, or with ``picks_only`` ``[B, T, H, K]``, the picks' own;
    dh0 float32, None unless ``needs_dh0``). Like the
    forward it reads and writes only the picked rows, of the gradient on the memory too (the
    others pass from dht to dh0 as they are); dlogits is 0 outside each token's picks. It
    recomputes the memory at each event from the carries."""
    B, T, H, V = v.shape
    K = events.rows.shape[-1]
    E = events.keys.shape[1]
    events = with_event_padding(events)
    if carries is None or carries.shape[1] != cdiv(E, SPARSE_TILE):
        raise ValueError(
            f"chunk_sparse_bwd needs the carries of chunk_sparse_fwd(..., store_carries=True) with tiles of "
            f"{SPARSE_TILE} events ([H, {cdiv(E, SPARSE_TILE)}, V]); "
            f"got {None if carries is None else tuple(carries.shape)}"
        )
    N = num_sequences(B, cu_seqlens)
    v, eta, mu, do = (x.contiguous() for x in (v, eta, mu, do))
    h0 = initial_state.contiguous() if initial_state is not None else None
    dht = dht.contiguous() if dht is not None else None
    dh0 = memory_copy(dht, N, H, M, V, v.device) if needs_dh0 else None
    BV = sparse_block_v(V)
    NV, NB = cdiv(V, BV), events.block_bounds.shape[1] - 1
    dv_contributions = torch.empty(B * T, H, K, V, dtype=v.dtype, device=v.device)
    # with one block of columns the kernel's parts are the gradients: no sum, nor a select (host time)
    pick_shape = (NV, B, T, H, K) if NV > 1 else (B, T, H, K)
    pick_dtheta, pick_dphi = (torch.empty(pick_shape, dtype=torch.float32, device=v.device) for _ in range(2))
    pieces = split_row_pieces(H, NB, V, v.device)
    for summary in (True, False):
        SPARSE_BWD.launch(
            (NB, H, NV),
            v, events.keys, events.picks, events.theta, events.phi, events.block_bounds, h0, carries, do, dht, dh0,
            dv_contributions, pick_dtheta, pick_dphi, *pieces, E, NB, carries.shape[1],
            H=H, M=M, K=K, V=V, BP=SPARSE_TILE, BV=BV, SUMMARY=summary, num_warps=SPARSE_WARPS,
        )  # fmt: skip
    dv = sum_over_picks(dv_contributions, v.dtype, v.shape)
    if NV > 1:
        pick_dtheta, pick_dphi = pick_dtheta.sum(0), pick_dphi.sum(0)

    dlogits = torch.empty(*eta.shape, K if picks_only else M, dtype=logits_dtype, device=v.device)
    deta, dmu = torch.empty_like(eta), torch.empty_like(mu)
    # 4 tokens per program, whole rows of up to 1024 logits at a time: best measured on an H200
    # at (1024, 16), 90 us, where 64 tokens took 173 (a zero fill of dlogits alone takes 83)
    BR, BM = 4, min(next_power_of_2(M), 1024)
    SPARSE_ROUTING_BWD.launch(
        (cdiv(eta.numel(), BR),),
        events.alpha, eta, mu, events.rows, pick_dtheta, pick_dphi, dlogits, deta, dmu, eta.numel(),
        M=M, K=K, BR=BR, KB=next_power_of_2(K), BM=BM, PICKS_ONLY=picks_only, num_warps=4,
    )  # fmt: skip
    return dv, dlogits, deta, dmu, dh0


def chunk_bwd(
    v: torch.Tensor,
    logits: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    saved: SavedForBackward,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    needs_dh0: bool,
    block_m: int | None = None,
    num_warps: int | None = None,
    walk: bool | None = None,
    state_walk: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dense backward from the forward's inputs and ``saved``: ``(dv, dlogits, deta, dmu, dh0)``
    in the layouts and dtypes of the inputs (dh0 float32, None unless ``needs_dh0``).
    ``block_m`` sets the blocks of rows of the dq/dk and dv kernels (and with it whether dalpha goes
    through a scratch); ``num_warps`` overrides the dq/dk kernel's warps and ``walk`` its form
    (``dqk_walks``), for tuning; ``state_walk`` the way to the gradient states (``chunk_states``'
    ``walk``)."""
    B, T, H, V = v.shape
    M = logits.shape[-1]
    v, logits, eta, mu, _, N = _prepare(v, logits, eta, mu, None, cu_seqlens)
    do = do.contiguous()
    dht = dht.contiguous() if dht is not None else None
    lse, dominant, states, scores, layout = saved
    grad_states, dh0 = chunk_states(
        do, logits, lse, eta, mu, dht, needs_dh0, layout, cu_seqlens, N, reverse=True, walk=state_walk
    )

    dv, dlogits, deta, dmu = (torch.empty_like(x) for x in (v, logits, eta, mu))
    BV = next_power_of_2(V)
    chunks = (layout.NT_total, H)
    common = dict(H=H, M=M, V=V, BT=CHUNK, BV=BV, DOT_PRECISION=dot_precision(v.dtype))
    x_dom = torch.empty(v.shape[:-1], dtype=torch.float32, device=v.device)
    walk = dqk_walks(V) if walk is None else walk
    # for the levels, <do_t, v_s> within each chunk, [B, T, H, CHUNK] float32: formed once, read by
    # every block of rows; the product contracts over V, whose block must be at least 16 (``dot_block``)
    pair_products = None if walk else torch.empty(*v.shape[:-1], CHUNK, dtype=torch.float32, device=v.device)
    BWD_DOMINANT.launch(
        chunks,
        v, logits, lse, eta, mu, dominant, do, states, grad_states, pair_products, x_dom,
        layout.chunk_indices, cu_seqlens, T, layout.NT, **common | dict(BV=dot_block(V, BV)), num_warps=4,
    )  # fmt: skip

    # best measured on an H200 (benchmarks/ops/NOTES.md, session 32) for the levels: blocks of 32
    # rows in 2 warps (at 255 registers, four such programs share an SM; 64 rows in 8 warps, one
    # program an SM, took 1.2x the backward's time at V = 64, 2x at V = 256), 4 warps for dv. The
    # walk's rows stay in one warp, so that its sums over a token's rows cross no warps, and its
    # float32 tiles of BM x V within 128 registers a thread
    BM = dot_block(M, block_m or (16 if walk and BV > 128 else 32))
    NM = cdiv(M, BM)
    # the softmax needs whole rows: with several blocks of rows, dalpha and the per-block sums
    # over rows wait in a scratch for the dv kernel; the walk also keeps dphi there between its
    # two passes
    dalpha = torch.empty(logits.shape, dtype=torch.float32, device=v.device) if NM > 1 or walk else None
    partial_sums = torch.empty(3, NM, eta.numel(), dtype=torch.float32, device=v.device) if NM > 1 else None
    dqk_outputs_and_sizes = (
        dlogits,
        deta,
        dmu,
        dalpha,
        partial_sums,
        layout.chunk_indices,
        cu_seqlens,
        T,
        layout.NT,
        eta.numel(),
    )
    if walk:
        BWD_DQK_WALK.launch(
            (*chunks, NM),
            v, logits, lse, eta, mu, dominant, x_dom, do, states, grad_states, *dqk_outputs_and_sizes,
            H=H, M=M, V=V, BT=CHUNK, BM=BM, BV=BV, SLICES=walk_slices(BV, states.element_size()),
            num_warps=num_warps or 1, maxnreg=WALK_MAX_REGISTERS,
        )  # fmt: skip
    else:
        BWD_DQK.launch(
            (*chunks, NM),
            v, logits, lse, eta, mu, dominant, x_dom, do, states, grad_states, pair_products, *dqk_outputs_and_sizes,
            **common | dict(BV=DQK_BLOCK_V), LEVELS=LEVELS, BM=BM, num_warps=num_warps or 2,
        )  # fmt: skip
    BWD_DV.launch(
        chunks,
        logits, lse, eta, mu, do, grad_states, scores, dv, dlogits, deta, dmu, dalpha if NM > 1 else None,
        partial_sums, layout.chunk_indices, cu_seqlens, T, layout.NT, eta.numel(),
        **common, BM=BM, num_warps=4,
    )  # fmt: skip
    return dv, dlogits, deta, dmu, dh0


# decode steps are short kernels whose eager time is mostly host time: they skip the JIT's dispatch
DENSE_DECODE = CompiledLauncher(fused_recurrent_fwd_kernel)
SPARSE_DECODE = CompiledLauncher(fused_recurrent_sparse_fwd_kernel)


class DecodeLaunch:
    """The decode kernel's launch for one kind of call: built from a call's inputs, it serves
    every call whose inputs have the same shapes, strides, dtypes, devices and 16-byte alignment
    (what fixes the kernel's specialisation and the launch's sizes), taking only the tensors.
    Dense (``topk`` None or M) or sparse (``topk`` < M: only the top-K rows of each token are
    read and written, in place in the state). Logits, eta and mu whose tokens lie at one stride
    (``token_stride``) are read in place, others copied. ``inplace_final_state`` writes the final
    state into ``initial_state`` (float32, contiguous). ``block_v`` and ``num_warps`` override the
    launch configuration (for tuning). Shapes as in the public op; no autograd."""

    def __init__(
        self,
        v: torch.Tensor,
        logits: torch.Tensor,
        eta: torch.Tensor,
        mu: torch.Tensor,
        initial_state: torch.Tensor | None,
        output_final_state: bool,
        cu_seqlens: torch.Tensor | None,
        topk: int | None = None,
        inplace_final_state: bool = False,
        block_v: int | None = None,
        num_warps: int | None = None,
    ):
        B, T, H, V = v.shape
        M = logits.shape[-1]
        self.sparse = topk is not None and topk < M
        if not self.sparse:
            _check_dense_m(M)
        N = num_sequences(B, cu_seqlens)
        self.state_shape = (N, H, M, V)
        self.output_final_state, self.inplace_final_state = output_final_state, inplace_final_state
        # read where they lie when each token's heads are packed (the layer's views: the logits in
        # its input projection's output, eta and mu in one [B, T, 2H] tensor): no copies, which
        # took 2 of a decode step's 18 launches per layer
        strides = [token_stride(x) for x in (logits, eta, mu)]
        self.copied = tuple(stride is None for stride in strides)
        stride_logits, stride_eta, stride_mu = (
            x.shape[2] * (x.shape[3] if x.dim() == 4 else 1) if stride is None else stride
            for x, stride in zip((logits, eta, mu), strides)
        )
        unit = stride_unit(stride_logits)
        self.ints = (T, stride_logits // unit, stride_eta, stride_mu)
        if self.sparse:
            # best measured on an H200 (benchmarks/ops/NOTES.md): one top-K per (sequence, head)
            # and block of 64 columns, in one warp: 7.2 us against 11.1 to 11.2 with 2 warps at
            # (M, K) = (1024, 16), both at B = 64, H = 8, V = 64 and at the 340M model's B = 32,
            # H = 4, V = 256; 9.8 against 13.3 at (4096, 16). Likely because the K searches,
            # reductions over the logits, stay within one warp (shuffles, no shared memory).
            # Float32 logits of more than 2048 rows take 2 warps or more, whose 64-bit ranking
            # keys would spill otherwise.
            BV = block_v or min(next_power_of_2(V), 64)
            BM, KB = next_power_of_2(M), next_power_of_2(topk)
            self.launcher, constexprs = SPARSE_DECODE, dict(
                H=H, M=M, V=V, K=topk, BM=BM, KB=KB, G=top_k_group(BM, KB), BV=BV,
                num_warps=num_warps or top_k_warps(logits.dtype, M),
            )  # fmt: skip
        else:
            # best measured on an H100 at M = 64 and 256; on an H200 at M = 256, blocks of 16 or 32
            # with 2 or 4 warps within 0.15 us of each other, 64 slower (benchmarks/ops/NOTES.md)
            BV = block_v or min(next_power_of_2(V), 32)
            self.launcher, constexprs = (
                DENSE_DECODE,
                dict(H=H, M=M, V=V, BM=next_power_of_2(M), BV=BV, num_warps=num_warps or 4),
            )
        self.grid, self.constexprs = (cdiv(V, BV), N * H), dict(LOGITS_UNIT=unit, **constexprs)
        self.kept: KeptKernel | None = None

    def __call__(
        self,
        v: torch.Tensor,
        logits: torch.Tensor,
        eta: torch.Tensor,
        mu: torch.Tensor,
        initial_state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(o, final state or None)`` of a call of the kind this launch was built for."""
        v = v.contiguous()
        copy_logits, copy_eta, copy_mu = self.copied
        logits = logits.contiguous() if copy_logits else logits
        eta = eta.contiguous() if copy_eta else eta
        mu = mu.contiguous() if copy_mu else mu
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.contiguous()  # the kernel indexes it as a flat array
        o = torch.empty_like(v)
        if self.sparse:
            # the kernel updates the state where it lies: a fresh copy unless asked to work in place
            ht = initial_state if self.inplace_final_state else memory_copy(initial_state, *self.state_shape, v.device)
            self._launch(v, logits, eta, mu, ht, o, cu_seqlens, *self.ints)
        else:
            h0 = initial_state.contiguous() if initial_state is not None else None
            if self.inplace_final_state:
                ht = initial_state  # each program reads its block of the state whole before writing it
            elif self.output_final_state:
                ht = torch.empty(self.state_shape, dtype=torch.float32, device=v.device)
            else:
                ht = None
            self._launch(v, logits, eta, mu, h0, o, ht, cu_seqlens, *self.ints)
        if self.inplace_final_state:
            # the kernels wrote behind autograd's back: a backward that saved this tensor (the sparse
            # one recomputes from its initial state) now fails loudly instead of silently
            torch.autograd.graph.increment_version(initial_state)
        return o, ht if self.output_final_state else None

    def _launch(self, *args) -> None:
        # the arguments' specialisation is the first call's, as the kind of call fixes it: past
        # the first launch, the compiled kernel runs without CompiledLauncher's key
        if self.kept is None:
            self.kept = self.launcher.launch(self.grid, *args, **self.constexprs)
        else:
            launch_kept(self.kept, args)


def fused_recurrent_fwd(
    v: torch.Tensor,
    logits: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    topk: int | None = None,
    inplace_final_state: bool = False,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token forward for decoding, no autograd: one ``DecodeLaunch`` (see there) of
    this call. Shapes as in the public op."""
    decode = DecodeLaunch(
        v, logits, eta, mu, initial_state, output_final_state, cu_seqlens, topk, inplace_final_state, block_v, num_warps
    )
    return decode(v, logits, eta, mu, initial_state, cu_seqlens)
