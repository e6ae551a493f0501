"""Host side of the Triton kernels: shapes, block sizes and launches."""

from __future__ import annotations

from typing import NamedTuple

import torch
from fla.ops.utils import prepare_chunk_indices, prepare_chunk_offsets

from fla_factmem.ops.compiled_launch import CompiledLauncher
from fla_factmem.ops.factorization_memory.chunk_bwd_kernels import (
    chunk_bwd_dominant_kernel,
    chunk_bwd_dqk_kernel,
    chunk_bwd_dv_kernel,
)
from fla_factmem.ops.factorization_memory.chunk_kernels import (
    chunk_fwd_o_kernel,
    chunk_state_increment_kernel,
    chunk_state_scan_kernel,
    logsumexp_kernel,
)
from fla_factmem.ops.factorization_memory.chunk_sparse_kernels import (
    chunk_sparse_state_walk_kernel,
    chunk_union_kernel,
)
from fla_factmem.ops.factorization_memory.fused_recurrent_kernels import (
    fused_recurrent_fwd_kernel,
    fused_recurrent_sparse_fwd_kernel,
)
from fla_factmem.ops.factorization_memory.routing import DENSE_TRITON_MAX_M, SparseRouting
from fla_factmem.ops.factorization_memory.routing_kernels import sparse_routing_bwd_kernel, sparse_routing_kernel

# BT: tokens per chunk. 32 measured faster than 64 on an H100 (benchmarks/ops/NOTES.md): the
# [BT, BT] tiles of the intra-chunk pairs stay small, at twice the chunk states' traffic.
CHUNK = 32
LEVELS = CHUNK.bit_length() - 1  # levels of intra-chunk pairs (chunk_kernels.py)
# Sparse: the smallest chunk that tl.dot takes, so that a chunk's union of picks (<= 16 K rows) stays small
SPARSE_CHUNK = 16
SPARSE_LEVELS = SPARSE_CHUNK.bit_length() - 1


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1). ``triton.next_power_of_2`` and ``triton.cdiv`` are
    constexpr functions, which cost 1.5 us a call on the host (Triton 3.6, the CI machine's CPU),
    against 0.04 us here; a decode step makes four such calls."""
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints (see ``next_power_of_2``)."""
    return -(-a // b)


def dqk_block_v(V: int) -> int:
    """Columns of V per step of the dq/dk kernel's loop: at most 64, so that its [BV, BM] tiles of
    the chunk states stay in registers. Measured on an H200 at the 340M speed models' shape
    (B=4, T=8192, H=4, V=256, M=1024, K=16, bf16): 13.8 ms per call with whole rows of V (in the
    model's profile), 6.5 ms with blocks of 64 (the op alone). The dv kernel keeps whole rows:
    blocks of V there recompute its gates per block (2.5 ms against 1.1 ms)."""
    return min(next_power_of_2(V), 64)


class ChunkLayout(NamedTuple):
    """How the sequences split into chunks: NT chunks per sequence (equal lengths), or the
    chunk_indices [NT_total, 2] and chunk_offsets [N + 1] of FLA for packed sequences."""

    NT: int
    NT_total: int
    chunk_indices: torch.Tensor | None
    chunk_offsets: torch.Tensor | None


def chunk_layout(B: int, T: int, cu_seqlens: torch.Tensor | None, chunk: int = CHUNK) -> ChunkLayout:
    if cu_seqlens is None:
        NT = cdiv(T, chunk)
        return ChunkLayout(NT, B * NT, None, None)
    # FLA's helpers, cached per cu_seqlens tensor; counting the chunks reads the lengths on the host once
    chunk_indices = prepare_chunk_indices(cu_seqlens, chunk)
    return ChunkLayout(0, chunk_indices.shape[0], chunk_indices, prepare_chunk_offsets(cu_seqlens, chunk))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 dots; bf16/fp16 inputs get tf32, well inside their own precision."""
    return "ieee" if dtype == torch.float32 else "tf32"


def logsumexp(logits: torch.Tensor, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``[B, T, H, M]`` logits and ``[B, T, H]`` eta -> the float32 log-sum-exp over M
    and the int32 dominant row (theta > 1/2, or -1), both ``[B, T, H]``."""
    M = logits.shape[-1]
    lse = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    dominant = torch.empty(logits.shape[:-1], dtype=torch.int32, device=logits.device)
    n_rows = lse.numel()
    BR = 16
    logsumexp_kernel[(cdiv(n_rows, BR),)](logits, eta, lse, dominant, n_rows, M=M, BR=BR, BM=next_power_of_2(M))
    return lse, dominant


def memory_copy(initial_state: torch.Tensor | None, N: int, H: int, M: int, V: int, device) -> torch.Tensor:
    """A contiguous float32 ``[N, H, M, V]`` copy of the initial state (zeros if None), for the
    sparse kernels to update in place."""
    if initial_state is None:
        return torch.zeros(N, H, M, V, dtype=torch.float32, device=device)
    return initial_state.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _prepare(v, logits, eta, mu, initial_state, cu_seqlens, dense=True):
    """Checks M (dense) and makes the inputs contiguous: ``(v, logits, eta, mu, h0, N)``, N sequences."""
    M = logits.shape[-1]
    if dense and M > DENSE_TRITON_MAX_M:
        raise ValueError(f"the dense Triton kernels take M <= {DENSE_TRITON_MAX_M}; got M = {M}")
    N = v.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    h0 = initial_state.contiguous() if initial_state is not None else None
    return (*(x.contiguous() for x in (v, logits, eta, mu)), h0, N)


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-chunk states ``[NT_total, H, M, V]`` float32 and the state at the far end ``[N, H, M, V]``.

    Forward (``x = v``, ``start`` = initial state): the memory at each chunk's start, and the
    final state. ``reverse`` (``x = do``, ``start`` = gradient on the final state): the gradient
    on the memory at each chunk's end from the tokens after it, and the gradient on the
    initial state.
    """
    _, T, H, V = x.shape
    M = logits.shape[-1]
    states = torch.empty(layout.NT_total, H, M, V, dtype=torch.float32, device=x.device)
    decays = torch.empty(layout.NT_total, H, M, dtype=torch.float32, device=x.device)
    BM, BV = min(next_power_of_2(M), 64), min(next_power_of_2(V), 64)
    grid = (cdiv(M, BM) * cdiv(V, BV), layout.NT_total, H)
    chunk_state_increment_kernel[grid](
        x, logits, lse, eta, mu, None, None, None, None, states, decays, layout.chunk_indices, cu_seqlens,
        T, layout.NT, H=H, M=M, K=M, V=V, BT=CHUNK, BM=BM, BV=BV, GRAD=reverse,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=4,
    )  # fmt: skip
    end = torch.empty(N, H, M, V, dtype=torch.float32, device=x.device) if store_end else None
    BM, BV = min(next_power_of_2(M), 16), min(next_power_of_2(V), 32)
    grid = (cdiv(M, BM) * cdiv(V, BV), N, H)
    chunk_state_scan_kernel[grid](
        states, decays, start, end, layout.chunk_offsets, cu_seqlens, layout.NT,
        H=H, M=M, V=V, BM=BM, BV=BV, REVERSE=reverse, num_warps=2,
    )  # fmt: skip
    return states, end


class SavedForBackward(NamedTuple):
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
    block_v: int = 64,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, SavedForBackward]:
    """Dense forward. Shapes as in ``chunk_factorization_memory``; returns ``(o, final state or
    None, what the backward needs)``; without ``store_scores`` (no backward will run) the saved
    scores are None. ``block_m``, ``block_v`` and ``num_warps`` set the output kernel's launch
    (for tuning)."""
    B, T, H, V = v.shape
    M = logits.shape[-1]
    v, logits, eta, mu, h0, N = _prepare(v, logits, eta, mu, initial_state, cu_seqlens)
    lse, dominant = logsumexp(logits, eta)
    layout = chunk_layout(B, T, cu_seqlens)
    states, ht = chunk_states(v, logits, lse, eta, mu, h0, output_final_state, layout, cu_seqlens, N, reverse=False)

    # best measured on an H100 (benchmarks/ops/sweep_launch_configs.py): blocks of 16 rows, 4 warps
    BM = min(next_power_of_2(M), block_m or 16)
    BV = min(next_power_of_2(V), block_v)
    o = torch.empty_like(v)
    # the intra-chunk scores, [B, T, H, CHUNK] float32: the backward's dv reads them back
    scores = torch.empty(*v.shape[:-1], CHUNK, dtype=torch.float32, device=v.device) if store_scores else None
    chunk_fwd_o_kernel[(layout.NT_total, H, cdiv(V, BV))](
        v, logits, lse, eta, mu, None, None, None, None, states, o, scores, layout.chunk_indices, cu_seqlens,
        T, layout.NT, H=H, M=M, K=M, V=V, BT=CHUNK, LEVELS=LEVELS, BM=BM, BV=BV,
        DOT_PRECISION=dot_precision(v.dtype), STORE_SCORES=store_scores, num_warps=num_warps or 4,
    )  # fmt: skip
    return o, ht, SavedForBackward(lse, dominant, states, scores, layout)


def top_k_group(BM: int, KB: int) -> int:
    """Logits per group of the grouped top-K (``routing_kernels.top_k_logits``): the power of 2
    nearest below sqrt(BM / KB), which balances the BM / G group maxima against the KB * G
    candidates; 1 (no groups) where that would leave fewer than 2 KB groups."""
    ratio = BM // KB
    return 1 if ratio < 4 else 1 << (ratio.bit_length() - 1) // 2


def sparse_routing(
    logits: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    topk: int,
    rows_per_program: int | None = None,
    num_warps: int | None = None,
) -> SparseRouting:
    """The sparse variant's routing in one pass over the logits, no autograd: each token's top
    ``topk`` rows (int32, largest logit first) and their theta and phi (float32), all
    ``[B, T, H, topk]``, from ``[B, T, H, M]`` logits and ``[B, T, H]`` eta, mu.
    ``rows_per_program`` and ``num_warps`` override the launch (for tuning)."""
    M = logits.shape[-1]
    logits, eta, mu = (x.contiguous() for x in (logits, eta, mu))
    picks = torch.empty(*eta.shape, topk, dtype=torch.int32, device=logits.device)
    theta, phi = (torch.empty(*eta.shape, topk, dtype=torch.float32, device=logits.device) for _ in range(2))
    BM, KB = next_power_of_2(M), next_power_of_2(topk)
    # best measured on an H200 (benchmarks/ops/NOTES.md): up to 4 rows of at most 4K logits per
    # program, one warp per 4K logits, so that the K reductions stay within a warp
    BR = rows_per_program or max(1, min(4, 4096 // BM))
    sparse_routing_kernel[(cdiv(eta.numel(), BR),)](
        logits, eta, mu, picks, theta, phi, eta.numel(), M=M, K=topk, BR=BR, BM=BM, KB=KB,
        G=top_k_group(BM, KB), num_warps=num_warps or max(1, BR * BM // 4096),
    )  # fmt: skip
    return SparseRouting(picks, theta, phi)


class SparseSavedForBackward(NamedTuple):
    """What the sparse backward needs besides the inputs: the picks (``SparseRouting``), each
    chunk's union (``chunk_union_kernel``: slot_picks, union_rows, union_count, and the dominant
    slot of every token) and the intra-chunk scores ``[B, T, H, 16]`` float32. Not the compact
    chunk-start states: the backward recomputes them (``sparse_chunk_states``)."""

    rows: torch.Tensor
    theta: torch.Tensor
    phi: torch.Tensor
    slot_picks: torch.Tensor
    union_rows: torch.Tensor
    union_count: torch.Tensor
    dominant: torch.Tensor | None
    scores: torch.Tensor | None
    layout: ChunkLayout


def sparse_gates(saved: SparseSavedForBackward) -> tuple:
    """The gate arguments of the chunk kernels in SPARSE mode (no logits, lse, eta or mu: each
    slot's theta and phi come from the pick that lands there)."""
    return None, None, None, None, saved.slot_picks, saved.theta, saved.phi, saved.union_count


def sparse_state_walk(
    states: torch.Tensor,
    decays: torch.Tensor,
    saved: SparseSavedForBackward,
    memory: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    reverse: bool,
) -> None:
    """The sequential pass over chunks, in place: ``memory`` [N, H, M, V] float32 goes from the
    initial to the final state (``reverse``: from the gradient on the final state to the one on
    the initial state) and ``states`` [NT_total, H, U, V] from the chunks' increments to the
    chunk-start states (``reverse``: the gradients on the chunk-end states)."""
    N, H, M, V = memory.shape
    U = states.shape[2]
    # a chunk's whole union in one tile of at most 16K elements
    BU = next_power_of_2(U)
    BV = max(min(next_power_of_2(V), 16384 // BU, 32), 1)
    # num_stages=1: no gather of a later chunk may be hoisted above this chunk's scatter
    chunk_sparse_state_walk_kernel[(cdiv(V, BV), N, H)](
        states, decays, saved.union_rows, saved.union_count, memory, saved.layout.chunk_offsets, cu_seqlens,
        saved.layout.NT, H=H, M=M, U=U, V=V, BU=BU, BV=BV, REVERSE=reverse,
        num_warps=4 if BU * BV <= 4096 else 8, num_stages=1,
    )  # fmt: skip


def sparse_increments(
    x: torch.Tensor, saved: SparseSavedForBackward, cu_seqlens: torch.Tensor | None, grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk's increment over its union, ``[NT_total, H, U, V]`` float32, and its decay
    ``[NT_total, H, U]``: of the memory (x = v) or, with ``grad``, of the gradient on the memory
    before it (x = do)."""
    _, T, H, V = x.shape
    K = saved.rows.shape[-1]
    NT_total, _, _, U = saved.slot_picks.shape
    states = torch.empty(NT_total, H, U, V, dtype=torch.float32, device=x.device)
    decays = torch.empty(NT_total, H, U, dtype=torch.float32, device=x.device)
    BM, BV = min(next_power_of_2(U), 64), min(next_power_of_2(V), 64)
    chunk_state_increment_kernel[(cdiv(U, BM) * cdiv(V, BV), NT_total, H)](
        x, *sparse_gates(saved), states, decays, saved.layout.chunk_indices, cu_seqlens, T, saved.layout.NT,
        H=H, M=U, K=K, V=V, BT=SPARSE_CHUNK, BM=BM, BV=BV, GRAD=grad, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=4,
    )  # fmt: skip
    return states, decays


def sparse_chunk_states(
    v: torch.Tensor,
    saved: SparseSavedForBackward,
    initial_state: torch.Tensor | None,
    M: int,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory at every chunk's start over the chunk's union, ``[NT_total, H, U, V]`` float32,
    and the memory after the last chunk, ``[N, H, M, V]`` float32: each chunk's increment, then
    the sequential walk from ``initial_state`` (zeros if None), which it leaves as it was."""
    B, _, H, V = v.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    states, decays = sparse_increments(v, saved, cu_seqlens, grad=False)
    memory = memory_copy(initial_state, N, H, M, V, v.device)  # the walk updates the memory where it lies
    sparse_state_walk(states, decays, saved, memory, cu_seqlens, reverse=False)
    return states, memory


def chunk_sparse_fwd(
    v: torch.Tensor,
    picks: SparseRouting,
    M: int,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    store_for_backward: bool = False,
    block_m: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, SparseSavedForBackward]:
    """Sparse forward over each token's K picks (``picks``, rows < M, e.g. from
    ``sparse_routing``): ``(o [B, T, H, V] in v's dtype, final state [N, H, M, V] float32 or
    None, what the backward needs)``. Rows outside every chunk's union of picks are never read or
    written; the per-chunk states, ``[NT_total, H, min(M, 16 K), V]`` float32, live only while it
    runs (the backward recomputes them). Without
    ``store_for_backward`` the saved scores and dominant slots are None. ``block_m`` and
    ``num_warps`` set the output kernel's launch (for tuning)."""
    B, T, H, V = v.shape
    K = picks.rows.shape[-1]
    U = min(M, SPARSE_CHUNK * K)
    v = v.contiguous()
    rows, theta, phi = (x.contiguous() for x in picks)
    layout = chunk_layout(B, T, cu_seqlens, SPARSE_CHUNK)
    dev = v.device

    slot_picks = torch.full((layout.NT_total, H, SPARSE_CHUNK, U), -1, dtype=torch.int16, device=dev)
    union_rows = torch.empty(layout.NT_total, H, U, dtype=torch.int32, device=dev)
    union_count = torch.empty(layout.NT_total, H, dtype=torch.int32, device=dev)
    dominant = torch.empty(B, T, H, dtype=torch.int32, device=dev) if store_for_backward else None
    chunk_union_kernel[(layout.NT_total, H)](
        rows, theta, slot_picks, union_rows, union_count, dominant, layout.chunk_indices, cu_seqlens, T, layout.NT,
        H=H, K=K, U=U, BT=SPARSE_CHUNK, BE=next_power_of_2(SPARSE_CHUNK * K), num_warps=4,
    )  # fmt: skip
    scores = torch.empty(B, T, H, SPARSE_CHUNK, dtype=torch.float32, device=dev) if store_for_backward else None
    saved = SparseSavedForBackward(rows, theta, phi, slot_picks, union_rows, union_count, dominant, scores, layout)
    states, memory = sparse_chunk_states(v, saved, initial_state, M, cu_seqlens)

    o = torch.empty_like(v)
    # best measured on an H200 at (M, K) = (1024, 16) and (4096, 16): blocks of 16 slots, 2 warps
    BM, BV = min(next_power_of_2(U), block_m or 16), min(next_power_of_2(V), 64)
    chunk_fwd_o_kernel[(layout.NT_total, H, cdiv(V, BV))](
        v, *sparse_gates(saved), states, o, scores, layout.chunk_indices, cu_seqlens, T, layout.NT,
        H=H, M=U, K=K, V=V, BT=SPARSE_CHUNK, LEVELS=SPARSE_LEVELS, BM=BM, BV=BV,
        DOT_PRECISION=dot_precision(v.dtype), STORE_SCORES=store_for_backward, num_warps=num_warps or 2,
    )  # fmt: skip
    return o, memory if output_final_state else None, saved


def chunk_sparse_bwd(
    v: torch.Tensor,
    logits: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    saved: SparseSavedForBackward,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    needs_dh0: bool,
    block_m: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sparse backward from the forward's inputs (``initial_state`` among them) and ``saved``
    (``chunk_sparse_fwd`` with ``store_for_backward``): ``(dv, dlogits, deta, dmu, dh0)`` in the
    layouts and dtypes of the inputs (dh0 float32, None unless ``needs_dh0``). Like the forward
    it reads and writes only the rows of each chunk's union, in the gradient on the memory too;
    dlogits is 0 outside each token's picks. ``block_m`` and ``num_warps`` set the dtheta/dphi
    kernel's launch (for tuning)."""
    _, T, H, V = v.shape
    M = logits.shape[-1]
    K = saved.rows.shape[-1]
    U = saved.slot_picks.shape[-1]
    layout = saved.layout
    v, logits, eta, mu, _, N = _prepare(v, logits, eta, mu, None, cu_seqlens, dense=False)
    do = do.contiguous()
    # the chunk-start states again, as in the forward: K * V floats per token and head, 16 times
    # the dense path's at K = 16, too many to keep from the forward (FLA's chunk_gla recomputes
    # its chunk states too); this costs one more increments pass and walk
    states, _ = sparse_chunk_states(v, saved, initial_state, M, cu_seqlens)

    grad_states, decays = sparse_increments(do, saved, cu_seqlens, grad=True)
    grad_memory = memory_copy(dht, N, H, M, V, v.device)
    sparse_state_walk(grad_states, decays, saved, grad_memory, cu_seqlens, reverse=True)

    gates = sparse_gates(saved)
    chunks = (layout.NT_total, H)
    common = dict(H=H, M=U, K=K, V=V, BT=SPARSE_CHUNK, BV=next_power_of_2(V), DOT_PRECISION=dot_precision(v.dtype))
    x_dom = torch.empty(v.shape[:-1], dtype=torch.float32, device=v.device)
    chunk_bwd_dominant_kernel[chunks](
        v, *gates[:-1], saved.dominant, do, states, grad_states, x_dom, layout.chunk_indices, cu_seqlens,
        T, layout.NT, **common, num_warps=4,
    )  # fmt: skip

    pick_dtheta, pick_dphi = (torch.empty_like(saved.theta) for _ in range(2))
    # best measured on an H200 at (M, K) in {(256, 4), (1024, 16), (4096, 16), (1024, 256)}: blocks
    # of 64 slots with 4 warps (8, the dense choice, was 1.2x slower)
    BM = min(next_power_of_2(U), block_m or 64)
    chunk_bwd_dqk_kernel[(*chunks, cdiv(U, BM))](
        v, *gates, saved.dominant, x_dom, do, states, grad_states, None, None, None, None, None,
        pick_dtheta, pick_dphi, layout.chunk_indices, cu_seqlens, T, layout.NT, eta.numel(),
        **common | dict(BV=dqk_block_v(V)), LEVELS=SPARSE_LEVELS, BM=BM, num_warps=num_warps or 4,
    )  # fmt: skip
    BM = min(next_power_of_2(U), 64)
    dv = torch.empty_like(v)
    chunk_bwd_dv_kernel[chunks](
        *gates, do, grad_states, saved.scores, dv, None, None, None, None, None,
        layout.chunk_indices, cu_seqlens, T, layout.NT, eta.numel(), **common, BM=BM, num_warps=4,
    )  # fmt: skip

    dlogits = torch.zeros_like(logits)
    deta, dmu = torch.empty_like(eta), torch.empty_like(mu)
    KB = next_power_of_2(K)
    BR = max(1, 1024 // KB)
    sparse_routing_bwd_kernel[(cdiv(eta.numel(), BR),)](
        logits, eta, mu, saved.rows, pick_dtheta, pick_dphi, dlogits, deta, dmu, eta.numel(),
        M=M, K=K, BR=BR, KB=KB, num_warps=4,
    )  # fmt: skip
    return dv, dlogits, deta, dmu, grad_memory if needs_dh0 else None


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Dense backward from the forward's inputs and ``saved``: ``(dv, dlogits, deta, dmu, dh0)``
    in the layouts and dtypes of the inputs (dh0 float32, None unless ``needs_dh0``).
    ``block_m`` sets the blocks of rows of the dq/dk and dv kernels (and with it whether dalpha goes
    through a scratch); ``num_warps`` overrides the dq/dk kernel's warps (for tuning)."""
    B, T, H, V = v.shape
    M = logits.shape[-1]
    v, logits, eta, mu, _, N = _prepare(v, logits, eta, mu, None, cu_seqlens)
    do = do.contiguous()
    dht = dht.contiguous() if dht is not None else None
    lse, dominant, states, scores, layout = saved
    grad_states, dh0 = chunk_states(do, logits, lse, eta, mu, dht, needs_dh0, layout, cu_seqlens, N, reverse=True)

    dv, dlogits, deta, dmu = (torch.empty_like(x) for x in (v, logits, eta, mu))
    BV = next_power_of_2(V)
    chunks = (layout.NT_total, H)
    common = dict(H=H, M=M, V=V, BT=CHUNK, BV=BV, DOT_PRECISION=dot_precision(v.dtype))
    x_dom = torch.empty(v.shape[:-1], dtype=torch.float32, device=v.device)
    no_picks = (None, None, None)
    chunk_bwd_dominant_kernel[chunks](
        v, logits, lse, eta, mu, *no_picks, dominant, do, states, grad_states, x_dom, layout.chunk_indices,
        cu_seqlens, T, layout.NT, **common, K=M, num_warps=4,
    )  # fmt: skip

    # best measured on an H100 (benchmarks/ops/NOTES.md): blocks of 64 rows with 8 warps for the
    # dq/dk kernel (4 warps for 32 rows; 8 warps there are 1.5x slower), 4 warps for dv
    BM = min(next_power_of_2(M), block_m or 64)
    NM = cdiv(M, BM)
    # the softmax needs whole rows: with several blocks of rows, dalpha and the per-block sums
    # over rows wait in a scratch for the dv kernel
    dalpha = torch.empty(logits.shape, dtype=torch.float32, device=v.device) if NM > 1 else None
    partial_sums = torch.empty(3, NM, eta.numel(), dtype=torch.float32, device=v.device) if NM > 1 else None
    chunk_bwd_dqk_kernel[(*chunks, NM)](
        v, logits, lse, eta, mu, *no_picks, None, dominant, x_dom, do, states, grad_states, dlogits, deta, dmu,
        dalpha, partial_sums, None, None, layout.chunk_indices, cu_seqlens, T, layout.NT, eta.numel(),
        **common | dict(BV=dqk_block_v(V)), K=M, LEVELS=LEVELS, BM=BM, num_warps=num_warps or max(4, BM // 8),
    )  # fmt: skip
    chunk_bwd_dv_kernel[chunks](
        logits, lse, eta, mu, *no_picks, None, do, grad_states, scores, dv, dlogits, deta, dmu, dalpha,
        partial_sums, layout.chunk_indices, cu_seqlens, T, layout.NT, eta.numel(),
        **common, K=M, BM=BM, num_warps=4,
    )  # fmt: skip
    return dv, dlogits, deta, dmu, dh0


# decode steps are short kernels whose eager time is mostly host time: they skip the JIT's dispatch
DENSE_DECODE = CompiledLauncher(fused_recurrent_fwd_kernel)
SPARSE_DECODE = CompiledLauncher(fused_recurrent_sparse_fwd_kernel)


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
    """Token-by-token forward for decoding; no autograd. Shapes as in the public op. Dense
    (``topk`` None or M) or sparse (``topk`` < M: only the top-K rows of each token are read and
    written, in place in the state). ``inplace_final_state`` writes the final state into
    ``initial_state`` (float32, contiguous). ``block_v`` and ``num_warps`` override the launch
    configuration (for tuning)."""
    B, T, H, V = v.shape
    M = logits.shape[-1]
    sparse = topk is not None and topk < M
    v, logits, eta, mu, h0, N = _prepare(v, logits, eta, mu, initial_state, cu_seqlens, dense=not sparse)
    o = torch.empty_like(v)
    if sparse:
        # the kernel updates the state where it lies: a fresh copy unless asked to work in place
        state = initial_state if inplace_final_state else memory_copy(h0, N, H, M, V, v.device)
        # best measured on an H200 (benchmarks/ops/NOTES.md): one top-K per (sequence, head) and
        # block of 64 columns, in one warp: 7.2 us against 11.1 to 11.2 with 2 warps at
        # (M, K) = (1024, 16), both at B = 64, H = 8, V = 64 and at the 340M model's B = 32, H = 4,
        # V = 256; 9.8 against 13.3 at (4096, 16). Likely because the K searches, reductions over
        # the logits, stay within one warp (shuffles, no shared memory).
        BV = block_v or min(next_power_of_2(V), 64)
        BM, KB = next_power_of_2(M), next_power_of_2(topk)
        SPARSE_DECODE.launch(
            (cdiv(V, BV), N * H), v, logits, eta, mu, state, o, cu_seqlens, T, H=H, M=M, V=V, K=topk, BM=BM, KB=KB,
            G=top_k_group(BM, KB), BV=BV, num_warps=num_warps or 1,
        )  # fmt: skip
        ht = state
    else:
        if inplace_final_state:
            ht = initial_state  # each program reads its block of the state whole before writing it
        else:
            ht = torch.empty(N, H, M, V, dtype=torch.float32, device=v.device) if output_final_state else None
        BM = next_power_of_2(M)
        BV = block_v or min(next_power_of_2(V), 32)  # best measured on an H100 at M = 64 and 256
        DENSE_DECODE.launch(
            (cdiv(V, BV), N * H), v, logits, eta, mu, h0, o, ht, cu_seqlens, T,
            H=H, M=M, V=V, BM=BM, BV=BV, num_warps=num_warps or 4,
        )  # fmt: skip
    if inplace_final_state:
        # the kernels wrote behind autograd's back: a backward that saved this tensor (the sparse
        # one recomputes from its initial state) now fails loudly instead of silently
        torch.autograd.graph.increment_version(initial_state)
    return o, ht if output_final_state else None
