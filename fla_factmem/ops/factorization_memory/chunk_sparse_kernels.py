"""Triton kernels of sparse (top-K) Factorization Memory that the dense path has no use for.

A chunk of BT tokens touches U, the union of the rows its tokens pick: at most BT * K of the M
rows. Everything chunk-parallel runs in that compact space: a chunk's state is |U| rows, not M,
and the dense kernels of ``chunk_kernels.py`` take it with their SPARSE switch on (gates from
the picks that land in each slot of U, with their theta and phi). Two kernels here bridge compact and full space:

1. ``chunk_union_kernel``, parallel over chunks: U in ascending row order, its size, and for
   each token and slot of U which of the token's picks lands there.
2. ``chunk_sparse_state_walk_kernel``, sequential over a sequence's chunks: the full memory
   [M, V] stays where it lies and only the rows in each chunk's U are read (kept as the
   chunk-start state) and written (decayed and incremented). Rows nobody picks are never
   touched, and the chunk-start states grow with T * K * V, not with (T / BT) * M * V. The
   backward runs the walk again to recompute them, then in reverse over the gradient on the
   memory.

The backward kernels of ``chunk_bwd_kernels.py`` take the compact space through the same
switch and leave the gradients on each pick's theta and phi; ``routing_kernels.py`` turns those
into gradients on the logits, eta and mu.
"""

import triton
import triton.language as tl

from fla_factmem.ops.factorization_memory.chunk_kernels import VARLEN_SWITCH, chunk_coordinates, sequence_chunks


@triton.heuristics({**VARLEN_SWITCH, "STORE_DOMINANT": lambda args: args["dominant"] is not None})
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_union_kernel(
    picks,
    pick_theta,
    slot_picks,
    union_rows,
    union_count,
    dominant,
    chunk_indices,
    cu_seqlens,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    U: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    STORE_DOMINANT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """picks: [B, T, H, K] int, the rows each token picks (distinct per token, largest logit
    first), pick_theta [B, T, H, K] their theta.
    union_rows: [NT_total, H, U] int32, the chunk's union in ascending order (the first
    union_count [NT_total, H] entries are set).
    slot_picks: [NT_total, H, BT, U] int16, all -1 on entry: for each token of the chunk and
    each slot of the union, which of the token's picks (0 .. K-1) lands there.
    dominant (STORE_DOMINANT, for the backward): [B, T, H] int32, the slot of the token's pick
    with theta > 1/2, or -1; only the first pick can have it (sum_k theta_k = eta <= 1).
    BE = next power of 2 of BT * K."""
    i_tc, i_h = tl.program_id(0), tl.program_id(1)
    _, i_c, bos, eos = chunk_coordinates(i_tc, chunk_indices, cu_seqlens, T, NT, IS_VARLEN)
    o_e = tl.arange(0, BE)
    t_e, k_e = o_e // K, o_e % K
    m_e = (o_e < BT * K) & (i_c * BT + t_e < eos - bos)
    pick = ((bos + i_c * BT + t_e) * H + i_h) * K + k_e
    # sort (row, pick) pairs packed into one int64: equal rows end up side by side
    row = tl.load(picks + pick, mask=m_e, other=0).to(tl.int64)
    packed = tl.where(m_e, row * BE + o_e, tl.full([BE], 2**62, tl.int64))
    packed = tl.sort(packed, 0)
    row, e = packed // BE, packed % BE
    valid = packed < 2**62
    first = valid & ((o_e == 0) | (row != tl.gather(row, tl.maximum(o_e - 1, 0), 0)))
    slot = tl.cumsum(first.to(tl.int32), 0) - 1
    chunk = i_tc.to(tl.int64) * H + i_h
    tl.store(slot_picks + (chunk * BT + e // K) * U + slot, (e % K).to(tl.int16), mask=valid)
    tl.store(union_rows + chunk * U + slot, row.to(tl.int32), mask=first)
    tl.store(union_count + chunk, tl.sum(first.to(tl.int32), 0))
    if STORE_DOMINANT:
        first_pick = valid & (e % K == 0)
        tok = (bos + i_c * BT + e // K) * H + i_h
        theta_first = tl.load(pick_theta + tok * K, mask=first_pick, other=0.0)
        tl.store(dominant + tok, tl.where(theta_first > 0.5, slot, -1), mask=first_pick)


@triton.jit
def union_of_chunk(
    states, decays, union_rows, union_count, chunk, exists, o_u, o_v, m_v, U: tl.constexpr, V: tl.constexpr
):
    """Of (global chunk, head) ``chunk``: the size of its union, the union's rows, its
    increment [BU, BV] and its decay [BU]; zeros where ``exists`` is False (then ``chunk`` may
    be out of range: its size is read from slot 0)."""
    m_u = o_u < tl.where(exists, U, 0)
    n_rows = tl.load(union_count + tl.where(exists, chunk, 0))
    rows = tl.load(union_rows + chunk * U + o_u, mask=m_u, other=0)
    increment = tl.load(states + (chunk * U + o_u)[:, None] * V + o_v[None, :], mask=m_u[:, None] & m_v[None, :])
    decay = tl.load(decays + chunk * U + o_u, mask=m_u)
    return n_rows, rows, increment, decay


@triton.heuristics(VARLEN_SWITCH)
@triton.jit(do_not_specialize=["NT"])
def chunk_sparse_state_walk_kernel(
    states,
    decays,
    union_rows,
    union_count,
    memory,
    chunk_offsets,
    cu_seqlens,
    NT,
    H: tl.constexpr,
    M: tl.constexpr,
    U: tl.constexpr,
    V: tl.constexpr,
    BU: tl.constexpr,
    BV: tl.constexpr,
    REVERSE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """memory: [N, H, M, V] float32, the initial state on entry and the final state on exit.
    states: [NT_total, H, U, V] float32, each chunk's increment on entry (decays [NT_total, H, U]
    its decay), the memory at the chunk's start on exit; both over the chunk's union
    (union_rows, union_count). One program per (block of value columns, sequence, head) walks
    the sequence's chunks in order and reads and writes only the rows of each union; BU >= U,
    so that a chunk is one gather and one scatter.
    REVERSE (backward): memory holds the gradient on the final state on entry and the gradient
    on the initial state on exit; states the chunks' gradient increments on entry and the
    gradient on the memory at each chunk's end from the tokens after it on exit."""
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first, count = sequence_chunks(chunk_offsets, i_n, NT, IS_VARLEN)
    o_u = tl.arange(0, BU)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    head_memory = memory + (i_n.to(tl.int64) * H + i_h) * M * V

    # the walk is latency-bound: everything of the next chunk that does not depend on the memory
    # (its union, increment and decay) is loaded while this one is gathered and scattered
    union = (states, decays, union_rows, union_count)
    step = -H if REVERSE else H
    chunk = (first + (count - 1) * (step < 0)) * H + i_h
    n_rows, rows, increment, decay = union_of_chunk(*union, chunk, count > 0, o_u, o_v, m_v, U, V)
    for i in range(count):
        later = chunk + step
        n_rows_later, rows_later, increment_later, decay_later = union_of_chunk(
            *union, later, i + 1 < count, o_u, o_v, m_v, U, V
        )
        m_uv = (o_u < n_rows)[:, None] & m_v[None, :]
        in_memory = head_memory + rows[:, None] * V + o_v[None, :]
        h = tl.load(in_memory, mask=m_uv, other=0.0)
        tl.store(states + (chunk * U + o_u)[:, None] * V + o_v[None, :], h, mask=m_uv)
        tl.store(in_memory, h * decay[:, None] + increment, mask=m_uv)
        # the next chunk may read rows written here, by other threads of this program
        tl.debug_barrier()
        chunk, n_rows, rows, increment, decay = later, n_rows_later, rows_later, increment_later, decay_later
