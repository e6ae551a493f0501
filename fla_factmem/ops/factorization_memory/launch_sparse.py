"""Host side of the sparse (top-K) chunk kernels (``chunk_sparse_kernels.py``): chunk sizes,
buffers and launches, forward and backward."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from fla_factmem.ops.factorization_memory.chunk_sparse_kernels import (
    chunk_pick_bwd_kernel,
    chunk_pick_fwd_kernel,
    chunk_pick_grad_increment_kernel,
    chunk_pick_sort_kernel,
    chunk_sparse_state_walk_kernel,
)
from fla_factmem.ops.factorization_memory.launch import ChunkLayout, _prepare, chunk_layout, dot_precision, memory_copy
from fla_factmem.ops.factorization_memory.routing import SparseRouting
from fla_factmem.ops.factorization_memory.routing_kernels import sparse_routing_bwd_kernel

# picks per tile of the sorted list: the [BP, BP] running products stay small
PICK_TILE = 64


def sparse_chunk_size(K: int) -> int:
    """Tokens per chunk: as many as keep a chunk's picks at 4096 (256 tokens at K = 16, 16 at
    K = 256). Long chunks move less state per token (a chunk reads and writes the rows it
    touches once, and with picks spread over M rows a longer chunk touches fewer per token);
    the sort of a chunk's picks bounds them."""
    return max(16, min(256, 4096 // triton.next_power_of_2(K)))


class SparseSavedForBackward(NamedTuple):
    """What the sparse backward needs besides the inputs: the picks (``SparseRouting``) and
    each chunk's sorted picks and union (``chunk_pick_sort_kernel``). Not the chunk-start
    states: the backward recomputes them (``sparse_chunk_states``)."""

    rows: torch.Tensor
    theta: torch.Tensor
    phi: torch.Tensor
    entries: torch.Tensor
    union_rows: torch.Tensor
    union_count: torch.Tensor
    layout: ChunkLayout


def pick_launch(saved: SparseSavedForBackward, V: int, dtype: torch.dtype) -> tuple[tuple, dict]:
    """The grid and the compile-time arguments shared by the kernels that walk the sorted picks."""
    NT_total, H, BE = saved.entries.shape
    BV = max(16, min(triton.next_power_of_2(V), 64))
    grid = (NT_total, H, triton.cdiv(V, BV))
    meta = dict(
        H=H, K=saved.rows.shape[-1], U=saved.union_rows.shape[-1], V=V, BT=saved.layout.size, BE=BE,
        BP=min(PICK_TILE, BE), BV=BV, DOT_PRECISION=dot_precision(dtype),
    )  # fmt: skip
    return grid, meta


def pick_warps(meta: dict) -> int:
    """4 warps, 8 when the [BT, BV] accumulator of outputs or dv would crowd 4."""
    return 4 if meta["BT"] * meta["BV"] <= 8192 else 8


def sparse_sort(rows: torch.Tensor, M: int, layout: ChunkLayout, cu_seqlens: torch.Tensor | None) -> tuple:
    """Each chunk's picks sorted by (row, token), ``[NT_total, H, BE]`` int32, its union of
    rows ``[NT_total, H, min(M, BT K)]`` int32 and the union's size ``[NT_total, H]`` int32."""
    _, T, H, K = rows.shape
    BT = layout.size
    BE = triton.next_power_of_2(BT * K)
    U = min(M, BT * K)
    entries = torch.empty(layout.NT_total, H, BE, dtype=torch.int32, device=rows.device)
    union_rows = torch.empty(layout.NT_total, H, U, dtype=torch.int32, device=rows.device)
    union_count = torch.empty(layout.NT_total, H, dtype=torch.int32, device=rows.device)
    chunk_pick_sort_kernel[(layout.NT_total, H)](
        rows, entries, union_rows, union_count, layout.chunk_indices, cu_seqlens, T, layout.NT,
        H=H, K=K, U=U, BT=BT, BE=BE, num_warps=4,
    )  # fmt: skip
    return entries, union_rows, union_count


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
    BU = triton.next_power_of_2(U)
    BV = max(min(triton.next_power_of_2(V), 16384 // BU, 32), 1)
    # num_stages=1: no gather of a later chunk may be hoisted above this chunk's scatter
    chunk_sparse_state_walk_kernel[(triton.cdiv(V, BV), N, H)](
        states, decays, saved.union_rows, saved.union_count, memory, saved.layout.chunk_offsets, cu_seqlens,
        saved.layout.NT, H=H, M=M, U=U, V=V, BU=BU, BV=BV, REVERSE=reverse,
        num_warps=4 if BU * BV <= 4096 else 8, num_stages=1,
    )  # fmt: skip


def sparse_chunk_states(
    v: torch.Tensor,
    saved: SparseSavedForBackward,
    initial_state: torch.Tensor | None,
    M: int,
    cu_seqlens: torch.Tensor | None,
    boundaries: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
    """The memory at every chunk's start over the chunk's union, ``[NT_total, H, U, V]``
    float32, the rows' decays over each chunk ``[NT_total, H, U]``, the memory after the last
    chunk ``[N, H, M, V]`` float32 (the walk leaves ``initial_state`` as it was) and, with
    ``boundaries``, the values from zero entering each tile of the sorted picks (for the
    backward)."""
    B, T, H, V = v.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    grid, meta = pick_launch(saved, V, v.dtype)
    states = torch.empty(saved.layout.NT_total, H, meta["U"], V, dtype=torch.float32, device=v.device)
    decays = torch.empty(saved.layout.NT_total, H, meta["U"], dtype=torch.float32, device=v.device)
    tiles = None
    if boundaries:
        n_tiles = meta["BE"] // meta["BP"]
        tiles = (
            torch.empty(saved.layout.NT_total, H, n_tiles, V, dtype=torch.float32, device=v.device),
            torch.empty(saved.layout.NT_total, H, n_tiles, dtype=torch.float32, device=v.device),
        )
    chunk_pick_fwd_kernel[grid](
        v, saved.theta, saved.phi, saved.entries, states, decays, *(tiles or (None, None)), None,
        saved.layout.chunk_indices, cu_seqlens, T, saved.layout.NT, **meta, OUTPUT=False, num_warps=pick_warps(meta),
    )  # fmt: skip
    memory = memory_copy(initial_state, N, H, M, V, v.device)  # the walk updates the memory where it lies
    sparse_state_walk(states, decays, saved, memory, cu_seqlens, reverse=False)
    return states, decays, memory, tiles


def chunk_sparse_fwd(
    v: torch.Tensor,
    picks: SparseRouting,
    M: int,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, SparseSavedForBackward]:
    """Sparse forward over each token's K picks (``picks``, rows < M, e.g. from
    ``sparse_routing``): ``(o [B, T, H, V] in v's dtype, final state [N, H, M, V] float32 or
    None, what the backward needs)``. Rows outside every chunk's union of picks are never read or
    written; the chunk-start states, ``[NT_total, H, min(M, BT K), V]`` float32, live only while
    it runs (the backward recomputes them). ``chunk_size`` (tokens per chunk, a power of 2 of
    at least 16) overrides ``sparse_chunk_size`` (for tests and tuning)."""
    B, T, H, V = v.shape
    K = picks.rows.shape[-1]
    v = v.contiguous()
    rows, theta, phi = (x.contiguous() for x in picks)
    layout = chunk_layout(B, T, cu_seqlens, chunk_size or sparse_chunk_size(K))
    saved = SparseSavedForBackward(rows, theta, phi, *sparse_sort(rows, M, layout, cu_seqlens), layout)
    states, _, memory, _ = sparse_chunk_states(v, saved, initial_state, M, cu_seqlens, boundaries=False)
    o = torch.empty_like(v)
    grid, meta = pick_launch(saved, V, v.dtype)
    chunk_pick_fwd_kernel[grid](
        v, theta, phi, saved.entries, states, None, None, None, o, layout.chunk_indices, cu_seqlens, T, layout.NT,
        **meta, OUTPUT=True, num_warps=pick_warps(meta),
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sparse backward from the forward's inputs (``initial_state`` among them) and ``saved``
    (``chunk_sparse_fwd``): ``(dv, dlogits, deta, dmu, dh0)`` in the layouts and dtypes of the
    inputs (dh0 float32, None unless ``needs_dh0``). Like the forward it reads and writes only
    the rows of each chunk's union, in the gradient on the memory too; dlogits is 0 outside each
    token's picks."""
    _, T, H, V = v.shape
    M = logits.shape[-1]
    K = saved.rows.shape[-1]
    layout = saved.layout
    v, logits, eta, mu, _, N = _prepare(v, logits, eta, mu, None, cu_seqlens, dense=False)
    do = do.contiguous()
    # the chunk-start states again, as in the forward (FLA's chunk_gla recomputes its chunk
    # states too), with the values entering each tile of the sorted picks
    states, decays, _, (boundary, boundary_decay) = sparse_chunk_states(
        v, saved, initial_state, M, cu_seqlens, boundaries=True
    )
    grid, meta = pick_launch(saved, V, v.dtype)
    chunks = (layout.chunk_indices, cu_seqlens, T, layout.NT)
    grad_states = torch.empty_like(states)
    chunk_pick_grad_increment_kernel[grid](
        do, saved.theta, saved.phi, saved.entries, grad_states, *chunks, **meta, num_warps=pick_warps(meta)
    )
    grad_memory = memory_copy(dht, N, H, M, V, v.device)
    sparse_state_walk(grad_states, decays, saved, grad_memory, cu_seqlens, reverse=True)

    dv = torch.empty_like(v)
    # each block of value columns leaves its share of dtheta and dphi, summed below
    pick_dtheta, pick_dphi = (torch.empty(grid[2], *saved.theta.shape, device=v.device) for _ in range(2))
    chunk_pick_bwd_kernel[grid](
        v, do, saved.theta, saved.phi, saved.entries, states, grad_states, boundary, boundary_decay, dv,
        pick_dtheta, pick_dphi, *chunks, saved.theta.numel(), **meta, num_warps=pick_warps(meta),
    )  # fmt: skip
    pick_dtheta, pick_dphi = pick_dtheta.sum(0), pick_dphi.sum(0)

    dlogits = torch.zeros_like(logits)
    deta, dmu = torch.empty_like(eta), torch.empty_like(mu)
    KB = triton.next_power_of_2(K)
    BR = max(1, 1024 // KB)
    sparse_routing_bwd_kernel[(triton.cdiv(eta.numel(), BR),)](
        logits, eta, mu, saved.rows, pick_dtheta, pick_dphi, dlogits, deta, dmu, eta.numel(),
        M=M, K=K, BR=BR, KB=KB, num_warps=4,
    )  # fmt: skip
    return dv, dlogits, deta, dmu, grad_memory if needs_dh0 else None
