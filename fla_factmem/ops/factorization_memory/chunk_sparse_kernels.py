"""Triton kernels of sparse (top-K) Factorization Memory, chunk-parallel, in pick space.

A chunk of BT tokens (``launch.sparse_chunk_size``, 256 at K = 16) makes BT * K picks: (token,
row, theta, phi). Sorted by (row, token), the picks of one row lie side by side, and the row's
moving average over the chunk is a linear recurrence along that run of the list:

    s_j = d_j s_{j-1} + theta_j v_{t_j},  d_j = 1 - theta_j,  s before the run = the row at the chunk's start.

Every kernel walks the sorted list in tiles of BP picks (64). Within a tile the recurrence is a
matrix product: s = F (theta v) + (running product of d) * start, with
F[j, i] = d_{i+1} ... d_j for picks i <= j of one row, built as a cumulative product over the
tile (never a quotient, so theta = 1, where d = 0, is exact). A run that crosses a tile boundary
carries its last value into the next tile. The work per token is O(K V), plus its share of the
rows the chunk touches: U, the union of its picks, which is at most min(M, BT K) rows and, for
picks spread at random, far fewer per token than the chunk's length times K.

1. ``chunk_pick_sort_kernel``, parallel over chunks: the sorted list (each entry the pick and
   the slot of its row in U) and U in ascending row order.
2. ``chunk_pick_fwd_kernel``, parallel over chunks: the recurrence from zero, which gives each
   row's increment over the chunk and its decay (the product of its d); or, with OUTPUT, from
   the chunk-start states, which gives o_t = sum_k phi_{t,k} s_{j(t,k)} (one product of a
   [BT, BP] matrix of phi with the tile's [BP, BV] values puts them back in token order).
3. ``chunk_sparse_state_walk_kernel``, sequential over a sequence's chunks: the full memory
   [M, V] stays where it lies and only the rows in each chunk's U are read (kept as the
   chunk-start state) and written (decayed and incremented). Rows nobody picks are never
   touched, and the chunk-start states are U * V floats per chunk, not M * V.
4. Backward: ``chunk_pick_grad_increment_kernel`` runs the recurrence of the gradient on the
   memory backwards over the list from zero (each row's gradient increment for the walk, run
   in reverse), and ``chunk_pick_bwd_kernel`` gives dtheta, dphi of each pick and dv from both
   recurrences, with the forward one's values at tile boundaries saved by kernel 2.
   ``routing_kernels.py`` turns dtheta and dphi into gradients on the logits, eta and mu.
"""

import triton
import triton.language as tl

from fla_factmem.ops.factorization_memory.chunk_kernels import (
    VARLEN_SWITCH,
    chunk_coordinates,
    product,
    sequence_chunks,
)


@triton.heuristics(VARLEN_SWITCH)
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_pick_sort_kernel(
    picks,
    entries,
    union_rows,
    union_count,
    chunk_indices,
    cu_seqlens,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    U: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """picks: [B, T, H, K] int, the rows each token picks (distinct per token).
    entries: [NT_total, H, BE] int32, the chunk's picks sorted by (row, token): slot * BE + e,
    with e = t * K + k the pick (token t of the chunk, its k-th pick) and slot the row's place
    in the union (only the chunk's first BT' K entries are set, BT' its number of tokens).
    union_rows: [NT_total, H, U] int32, the union in ascending order (the first union_count
    [NT_total, H] entries are set). BE = next power of 2 of BT * K."""
    i_tc, i_h = tl.program_id(0), tl.program_id(1)
    _, i_c, bos, eos = chunk_coordinates(i_tc, chunk_indices, cu_seqlens, T, NT, IS_VARLEN)
    o_e = tl.arange(0, BE)
    t_e, k_e = o_e // K, o_e % K
    m_e = (o_e < BT * K) & (i_c * BT + t_e < eos - bos)
    row = tl.load(picks + ((bos + i_c * BT + t_e) * H + i_h) * K + k_e, mask=m_e, other=0).to(tl.int64)
    # (row, pick) packed into one int64: one sort orders by row, then token
    packed = tl.sort(tl.where(m_e, row * BE + o_e, tl.full([BE], 2**62, tl.int64)), 0)
    row, e = packed // BE, packed % BE
    valid = packed < 2**62
    first = valid & ((o_e == 0) | (row != tl.gather(row, tl.maximum(o_e - 1, 0), 0)))
    slot = tl.cumsum(first.to(tl.int32), 0) - 1
    chunk = i_tc.to(tl.int64) * H + i_h
    tl.store(entries + chunk * BE + o_e, (slot.to(tl.int64) * BE + e).to(tl.int32), mask=valid)
    tl.store(union_rows + chunk * U + slot, row.to(tl.int32), mask=first)
    tl.store(union_count + chunk, tl.sum(first.to(tl.int32), 0))


@triton.jit
def pick_entries(entries, chunk, tok0, i_h, p, n_e, H: tl.constexpr, K: tl.constexpr, BE: tl.constexpr):
    """Entries p of the chunk's sorted list: the slot of each one's row, its token within the
    chunk and its flat index into [B, T, H, K]. Positions outside [0, n_e) get distinct
    negative slots (so they share a run with nothing) and token and pick 0."""
    m = (p >= 0) & (p < n_e)
    packed = tl.load(entries + chunk * BE + p, mask=m, other=0)
    e = packed % BE
    tok = tl.where(m, e // K, 0)
    pick = tl.where(m, ((tok0 + tok) * H + i_h) * K + e % K, 0)
    return tl.where(m, packed // BE, -2 - p).to(tl.int32), tok, pick


@triton.jit
def pick_tile(
    pick_theta, entries, chunk, tok0, i_h, j0, n_e, H: tl.constexpr, K: tl.constexpr, BE: tl.constexpr,
    BP: tl.constexpr,
):  # fmt: skip
    """The tile of entries j0 .. j0 + BP - 1: slots, tokens, picks, d = 1 - theta, theta, the d
    of each entry's predecessor in the list, and ``same`` [BP, BP] (both entries of one row)."""
    p = j0 + tl.arange(0, BP)
    slot, tok, pick = pick_entries(entries, chunk, tok0, i_h, p, n_e, H, K, BE)
    slot_prev, _, pick_prev = pick_entries(entries, chunk, tok0, i_h, p - 1, n_e, H, K, BE)
    theta = tl.load(pick_theta + pick, mask=slot >= 0, other=0.0)
    d_prev = 1.0 - tl.load(pick_theta + pick_prev, mask=slot_prev >= 0, other=0.0)
    same = slot[:, None] == slot[None, :]
    return slot, tok, pick, 1.0 - theta, theta, d_prev, same


@triton.jit
def token_rows(x, tok0, tok, slot, i_h, o_v, m_v, H: tl.constexpr, V: tl.constexpr):
    """[BP, BV] float32: row tok0 + tok of x ([B, T, H, V]) for each entry, 0 where slot < 0."""
    m = (slot >= 0)[:, None] & m_v[None, :]
    return tl.load(x + ((tok0 + tok) * H + i_h)[:, None] * V + o_v[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def slot_rows(x, chunk, slot, o_v, m_v, U: tl.constexpr, V: tl.constexpr):
    """[BP, BV] float32: the chunk's compact state row of each entry's slot ([NT_total, H, U, V])."""
    m = (slot >= 0)[:, None] & m_v[None, :]
    return tl.load(x + (chunk * U + slot)[:, None] * V + o_v[None, :], mask=m, other=0.0)


@triton.jit
def scan_forward(d, d_prev, same, theta, x, before, BP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Within a tile, s_j = d_j s_{j-1} + theta_j x_j along each row's run, starting from
    ``before`` (per entry: the row's value before its run's first entry in the tile). Returns
    (s_{j-1}, s_j), both [BP, BV]."""
    o_p = tl.arange(0, BP)
    r, c = o_p[:, None], o_p[None, :]
    # decay[j, i] = d_{i+1} ... d_{j-1}: a running product down the columns of the predecessors' d
    decay = tl.cumprod(tl.where(r > c + 1, d_prev[:, None], 1.0), axis=0)
    decay = tl.where(same & (r > c), decay, 0.0)
    decay_before = product(tl.where(same & (c < r), d[None, :], 1.0), 1)
    s_prev = tl.dot(decay, theta[:, None] * x, input_precision=DOT_PRECISION) + decay_before[:, None] * before
    # the step written with theta, not d: Triton 3.6 fails to compile d[:, None] here on Hopper
    # (TritonGPURemoveLayoutConversions, with d also used along the other axis)
    return s_prev, s_prev + theta[:, None] * (x - s_prev)


@triton.jit
def scan_backward(d, same, y, after, BP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Within a tile, g_j = y_j + d_{j+1} g_{j+1} along each row's run, ending with ``after``
    (per entry: the gradient on the row's value after its run's last entry in the tile).
    Returns g [BP, BV]."""
    o_p = tl.arange(0, BP)
    r, c = o_p[:, None], o_p[None, :]
    # decay[j, i] = d_{j+1} ... d_i: a running product along the rows
    decay = tl.cumprod(tl.where(c > r, d[None, :], 1.0), axis=1)
    decay = tl.where(same & (c >= r), decay, 0.0)
    decay_after = product(tl.where(same & (c > r), d[None, :], 1.0), 1)
    return tl.dot(decay, y, input_precision=DOT_PRECISION) + decay_after[:, None] * after


@triton.jit
def entry_of(x, o_p, i):
    """Entry i of a [BP] tensor (a scalar)."""
    return tl.sum(tl.where(o_p == i, x, 0), 0)


@triton.jit
def row_of(x, o_p, i):
    """Row i of a [BP, BV] tile (a [BV] tensor)."""
    return tl.sum(tl.where((o_p == i)[:, None], x, 0.0), 0)


@triton.jit
def chunk_picks(chunk_indices, cu_seqlens, i_tc, i_h, T, NT, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                IS_VARLEN: tl.constexpr):  # fmt: skip
    """(global chunk * H + head, flat index of its first token, its number of tokens, its number of picks)."""
    _, i_c, bos, eos = chunk_coordinates(i_tc, chunk_indices, cu_seqlens, T, NT, IS_VARLEN)
    n_tok = tl.minimum(eos - bos - i_c * BT, BT)
    return i_tc.to(tl.int64) * H + i_h, bos + i_c * BT, n_tok, n_tok * K


@triton.heuristics({**VARLEN_SWITCH, "STORE_BOUNDARY": lambda args: args["boundary"] is not None})
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_pick_fwd_kernel(
    v,
    pick_theta,
    pick_phi,
    entries,
    states,
    decays,
    boundary,
    boundary_decay,
    o,
    chunk_indices,
    cu_seqlens,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    U: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BP: tl.constexpr,
    BV: tl.constexpr,
    OUTPUT: tl.constexpr,
    STORE_BOUNDARY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """One program per (chunk, head, block of BV value columns) walks the chunk's sorted picks.
    v: [B, T, H, V]; pick_theta, pick_phi: [B, T, H, K] float32; entries from the sort.
    Without OUTPUT: the recurrence from zero; states [NT_total, H, U, V] float32 gets each row's
    increment over the chunk and decays [NT_total, H, U] its decay (at the row's slot).
    STORE_BOUNDARY (for the backward): boundary [NT_total, H, BE / BP, V] gets the value from
    zero entering each tile and boundary_decay [NT_total, H, BE / BP] the product of d since its
    run began. With OUTPUT: the recurrence from the chunk-start states in ``states``; o
    [B, T, H, V] gets the outputs, in v's dtype."""
    i_tc, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    chunk, tok0, n_tok, n_e = chunk_picks(chunk_indices, cu_seqlens, i_tc, i_h, T, NT, H, K, BT, IS_VARLEN)
    o_p = tl.arange(0, BP)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    carry = tl.zeros([BV], dtype=tl.float32)  # the value of the run that enters the tile
    carry_decay = tl.full([], 1.0, tl.float32)  # the product of its d so far (from zero only)
    carry_slot = tl.full([], -1, tl.int32)
    if OUTPUT:
        o_t = tl.arange(0, BT)
        acc = tl.zeros([BT, BV], dtype=tl.float32)
    for j0 in range(0, n_e, BP):
        if STORE_BOUNDARY:
            tile = chunk * (BE // BP) + j0 // BP
            tl.store(boundary + tile * V + o_v, carry, mask=m_v)
            tl.store(boundary_decay + tile, carry_decay)
        slot, tok, pick, d, theta, d_prev, same = pick_tile(pick_theta, entries, chunk, tok0, i_h, j0, n_e, H, K, BE, BP)
        x = token_rows(v, tok0, tok, slot, i_h, o_v, m_v, H, V)
        cont = slot == carry_slot
        if OUTPUT:
            before = tl.where(cont[:, None], carry[None, :], slot_rows(states, chunk, slot, o_v, m_v, U, V))
        else:
            before = tl.where(cont[:, None], carry[None, :], 0.0)
        _, s = scan_forward(d, d_prev, same, theta, x, before, BP, DOT_PRECISION)
        if OUTPUT:
            phi = tl.load(pick_phi + pick, mask=slot >= 0, other=0.0)
            merge = tl.where(o_t[:, None] == tok[None, :], phi[None, :], 0.0)
            acc += tl.dot(merge, s, input_precision=DOT_PRECISION)
        else:
            # a row's increment and decay are its run's values at its last entry
            slot_next, _, _ = pick_entries(entries, chunk, tok0, i_h, j0 + o_p + 1, n_e, H, K, BE)
            last = (slot >= 0) & (slot != slot_next)
            run_decay = product(tl.where(same & (o_p[None, :] <= o_p[:, None]), d[None, :], 1.0), 1)
            run_decay = tl.where(cont, carry_decay, 1.0) * run_decay
            tl.store(states + (chunk * U + slot)[:, None] * V + o_v[None, :], s, mask=last[:, None] & m_v[None, :])
            tl.store(decays + chunk * U + slot, run_decay, mask=last)  # the same from every block of columns
            carry_decay = entry_of(run_decay, o_p, BP - 1)
        carry = row_of(s, o_p, BP - 1)
        carry_slot = entry_of(slot, o_p, BP - 1)
    if OUTPUT:
        m_t = o_t < n_tok
        p_o = o + ((tok0 + o_t) * H + i_h)[:, None] * V + o_v[None, :]
        tl.store(p_o, acc.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


@triton.heuristics(VARLEN_SWITCH)
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_pick_grad_increment_kernel(
    do,
    pick_theta,
    pick_phi,
    entries,
    grad_states,
    chunk_indices,
    cu_seqlens,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    U: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BP: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The gradient on the memory at the chunk's start from the chunk's own outputs (do
    [B, T, H, V]): per row, d_first g_first with g_j = phi_j do_{t_j} + d_{j+1} g_{j+1} along its
    run from zero at the chunk's end; into grad_states [NT_total, H, U, V] at the row's slot.
    The row's decay is the forward's. Tiles run from the list's end to its start."""
    i_tc, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    chunk, tok0, n_tok, n_e = chunk_picks(chunk_indices, cu_seqlens, i_tc, i_h, T, NT, H, K, BT, IS_VARLEN)
    o_p = tl.arange(0, BP)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    carry = tl.zeros([BV], dtype=tl.float32)  # d g of the first entry of the tile after
    carry_slot = tl.full([], -1, tl.int32)
    n_tiles = tl.cdiv(n_e, BP)
    for i in range(n_tiles):
        j0 = (n_tiles - 1 - i) * BP
        slot, tok, pick, d, _, _, same = pick_tile(pick_theta, entries, chunk, tok0, i_h, j0, n_e, H, K, BE, BP)
        phi = tl.load(pick_phi + pick, mask=slot >= 0, other=0.0)
        y = phi[:, None] * token_rows(do, tok0, tok, slot, i_h, o_v, m_v, H, V)
        after = tl.where((slot == carry_slot)[:, None], carry[None, :], 0.0)
        dg = d[:, None] * scan_backward(d, same, y, after, BP, DOT_PRECISION)
        slot_prev, _, _ = pick_entries(entries, chunk, tok0, i_h, j0 + o_p - 1, n_e, H, K, BE)
        first = (slot >= 0) & (slot != slot_prev)
        tl.store(grad_states + (chunk * U + slot)[:, None] * V + o_v[None, :], dg, mask=first[:, None] & m_v[None, :])
        carry = row_of(dg, o_p, 0)
        carry_slot = entry_of(slot, o_p, 0)


@triton.heuristics(VARLEN_SWITCH)
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_pick_bwd_kernel(
    v,
    do,
    pick_theta,
    pick_phi,
    entries,
    states,
    grad_states,
    boundary,
    boundary_decay,
    dv,
    pick_dtheta,
    pick_dphi,
    chunk_indices,
    cu_seqlens,
    T,
    NT,
    n_picks,
    H: tl.constexpr,
    K: tl.constexpr,
    U: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BE: tl.constexpr,
    BP: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Gradients of one chunk: dv [B, T, H, V] (value columns of this program), and this block
    of columns' share of dtheta and dphi of every pick, into pick_dtheta and pick_dphi
    [NV, B, T, H, K] at i_v * n_picks. states: the chunk-start states; grad_states: the gradient
    on the memory at the chunk's end (both [NT_total, H, U, V], at the rows' slots); boundary
    and boundary_decay from ``chunk_pick_fwd_kernel``. Tiles run from the list's end to its
    start, carrying the gradient; the forward values entering each tile come from the
    boundaries: boundary_decay * start + boundary."""
    i_tc, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    chunk, tok0, n_tok, n_e = chunk_picks(chunk_indices, cu_seqlens, i_tc, i_h, T, NT, H, K, BT, IS_VARLEN)
    o_p = tl.arange(0, BP)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    carry = tl.zeros([BV], dtype=tl.float32)
    carry_slot = tl.full([], -1, tl.int32)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    n_tiles = tl.cdiv(n_e, BP)
    for i in range(n_tiles):
        j0 = (n_tiles - 1 - i) * BP
        slot, tok, pick, d, theta, d_prev, same = pick_tile(pick_theta, entries, chunk, tok0, i_h, j0, n_e, H, K, BE, BP)
        x = token_rows(v, tok0, tok, slot, i_h, o_v, m_v, H, V)
        dox = token_rows(do, tok0, tok, slot, i_h, o_v, m_v, H, V)
        phi = tl.load(pick_phi + pick, mask=slot >= 0, other=0.0)
        # the forward values, from the chunk-start rows and the value entering the tile
        start = slot_rows(states, chunk, slot, o_v, m_v, U, V)
        tile = chunk * (BE // BP) + j0 // BP
        entering = tl.load(boundary_decay + tile) * start + tl.load(boundary + tile * V + o_v, mask=m_v)[None, :]
        slot_entering, _, _ = pick_entries(entries, chunk, tok0, i_h, j0 - 1, n_e, H, K, BE)
        before = tl.where((slot == slot_entering)[:, None], entering, start)
        s_prev, s = scan_forward(d, d_prev, same, theta, x, before, BP, DOT_PRECISION)
        # the gradient, from the chunk-end gradient rows and the tile after
        after = tl.where((slot == carry_slot)[:, None], carry[None, :], slot_rows(grad_states, chunk, slot, o_v, m_v, U, V))
        g = scan_backward(d, same, phi[:, None] * dox, after, BP, DOT_PRECISION)

        m_p = slot >= 0
        tl.store(pick_dphi + i_v * n_picks + pick, tl.sum(dox * s, 1), mask=m_p)
        tl.store(pick_dtheta + i_v * n_picks + pick, tl.sum(g * (x - s_prev), 1), mask=m_p)
        spread = tl.where(o_t[:, None] == tok[None, :], theta[None, :], 0.0)
        acc += tl.dot(spread, g, input_precision=DOT_PRECISION)
        carry = row_of(d[:, None] * g, o_p, 0)
        carry_slot = entry_of(slot, o_p, 0)
    m_t = o_t < n_tok
    p_dv = dv + ((tok0 + o_t) * H + i_h)[:, None] * V + o_v[None, :]
    tl.store(p_dv, acc.to(dv.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


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
