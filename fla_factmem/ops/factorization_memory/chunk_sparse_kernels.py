"""Triton kernels of sparse (top-K) Factorization Memory in training and prefill: the memory
row by row, over the tokens that pick each row.

A token's K picks are K events, each on one row of its sequence's memory. Sorted by (sequence,
row), stably in token order (``launch.sparse_events``), the events of one row lie side by
side, and along them the row follows a scalar linear recurrence:

    h_e = d_e h_{e-1} + theta_e v_e,   d_e = 1 - theta_e,

from the initial state's row at the row's first event to the final state's row at its last.
Rows nobody picks have no events: they are neither read nor written, and per token the work and
traffic are K * V, whatever M. No chunk states exist; the backward keeps the sorted events (key,
pick and weights), the routing's rows and alpha (T * K values each per head), the programs'
block bounds, and the memory entering each of the forward's tiles of events (below), T * K * V /
BP values per head.

Each program takes one block of consecutive (sequence, row) keys, whose events are one range of
the sorted list, over a block of up to 256 columns in one warp, and walks it in tiles of BP
events aligned among the head's events: it issues the tile's loads first (they do not depend on
the memory), then takes the events one at a time, each a scalar event and a [BV] row.

A row picked far more often than most (a trained router's hot rows: up to 14 times the mean
in the 340M model's deeper layers) is split between blocks at tiles, so that no program walks
much more than 2 S events (``sparse_events_kernel``), besides a walk over the summaries of its
row's pieces before it (one [BV] load each). Along a split row the memory is affine in
what enters each piece, with a scalar decay: a first launch (SUMMARY) writes each piece's part
from a zero memory and its decay, and the scan's launch chains the pieces before a block (the
backward: the gradient's pieces after it) into what enters it.

1. ``chunk_sparse_fwd_kernel``: along each row h_e from h_{e-1} (or the initial state's row at
   the row's first event); phi_e h_e goes to the event's slot [token, head, pick] of a buffer in
   v's dtype that ``sum_over_picks_kernel`` sums, in float32, into o, and the last event of each
   row writes the final state's row. With a backward to come, it also stores the memory entering
   each tile (the carry).
2. ``chunk_sparse_bwd_kernel``: the gradient on the memory runs the other way along each row,

       g_e = phi_e do_t + d_{e+1} g_{e+1}   (the gradient on the final state after the last).

   Walking the tiles in reverse, with each tile's h_e recomputed from its carry and kept in
   registers, each event gives dv_t its theta_e g_e (summed over the picks like o), dtheta_e =
   <g_e, v_t - h_{e-1}>, dphi_e = <do_t, h_e>, and the first event of each row the initial
   state's gradient d_e g_e. ``routing_kernels.py`` turns dtheta and dphi into gradients on the
   logits, eta and mu.

Decays are products of factors in [0, 1] (theta = 1 is an exact 0 that cuts the row's
history); nothing is ever divided by one, and no exponent appears (SPEC section 3).
"""

import triton
import triton.language as tl

FORWARD_SWITCHES = {
    "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
    "STORE_FINAL_STATE": lambda args: args["ht"] is not None,
    "STORE_CARRIES": lambda args: args["carries"] is not None,
}
BACKWARD_SWITCHES = {
    "USE_INITIAL_STATE": FORWARD_SWITCHES["USE_INITIAL_STATE"],
    "USE_FINAL_STATE_GRADIENT": lambda args: args["dht"] is not None,
    "STORE_INITIAL_STATE_GRADIENT": lambda args: args["dh0"] is not None,
}


@triton.jit
def event_at(keys, picks, theta, phi, p, lo, hi):
    """The event at sorted position p of a head (readable: the arrays are padded): whether it
    lies in [lo, hi), its key, whether it starts and ends its row's run, its pick, theta and phi;
    pick, theta and phi are 0 outside [lo, hi). ``keys`` holds each key shifted left by 2 with
    the run's start and end flags in bits 0 and 1 (``sparse_events_kernel``): the row's, whose
    run may begin or go on outside the block where the row is split."""
    valid = (p >= lo) & (p < hi)
    packed = tl.load(keys + p)
    pick = tl.where(valid, tl.load(picks + p), 0)
    theta_e = tl.where(valid, tl.load(theta + p), 0.0)
    phi_e = tl.where(valid, tl.load(phi + p), 0.0)
    return valid, packed >> 2, valid & ((packed & 1) != 0), valid & ((packed & 2) != 0), pick, theta_e, phi_e


@triton.jit
def where_also(mask, condition):
    """mask where the scalar condition holds, else False: ``mask & condition``, which the
    interpreter refuses for a scalar condition."""
    return tl.where(condition, mask, False)


@triton.jit
def at_token(x, pick, valid, K: tl.constexpr, V: tl.constexpr, o_v, m_v):
    """x's columns o_v [BV] (x: [tokens, H, V], in its dtype) at the token of ``pick`` (a flat
    index of [tokens, H, K]), zeros unless valid."""
    return tl.load(x + (pick // K).to(tl.int64) * V + o_v, mask=where_also(m_v, valid), other=0.0)


@triton.jit
def state_row(state, key, i_h, H: tl.constexpr, M: tl.constexpr, V: tl.constexpr, o_v):
    """Pointers [BV] to columns o_v of row ``key`` (sequence * M + row) of a [N, H, M, V] state."""
    return state + ((key // M).to(tl.int64) * H + i_h) * M * V + (key % M) * V + o_v


@triton.jit
def state_row_where(
    x, state, key, condition, i_h, H: tl.constexpr, M: tl.constexpr, V: tl.constexpr, o_v, m_v, HAS_STATE: tl.constexpr
):
    """x [BV], or where the scalar condition holds, row ``key`` of ``state`` (zeros unless HAS_STATE)."""
    if HAS_STATE:
        row = tl.load(state_row(state, key, i_h, H, M, V, o_v), mask=where_also(m_v, condition), other=0.0)
        return tl.where(condition, row, x)
    return tl.where(condition, 0.0, x)


@triton.jit
def memory_after(
    h, h0, key, first, theta_e, v_e, i_h, H: tl.constexpr, M: tl.constexpr, V: tl.constexpr, o_v, m_v,
    USE_INITIAL_STATE: tl.constexpr,
):  # fmt: skip
    """The row's memory [BV] after an event, (1 - theta_e) h + theta_e v_e, from h [BV] before it,
    or where the event starts its row (``first``) from the initial state's row ``key``."""
    h = state_row_where(h, h0, key, first, i_h, H, M, V, o_v, m_v, USE_INITIAL_STATE)
    return (1.0 - theta_e) * h + theta_e * v_e.to(tl.float32)


@triton.jit
def chained_state(states, decays, i, step, NB, V: tl.constexpr, o_v, m_v):
    """The memory (or its gradient) that enters a block from the pieces of its row in the blocks
    i, i + step, ... (step -1: the blocks before, the forward; +1: after, the backward): their
    ``states`` [NB, V] summed, each times the ``decays`` [NB] of the pieces between, up to the
    first piece whose decay is 0 (where the row starts, or ends)."""
    total = tl.zeros(o_v.shape, dtype=tl.float32)
    decay = tl.full([], 1.0, tl.float32)
    while (decay != 0.0) & (i >= 0) & (i < NB):
        total += decay * tl.load(states + i * V + o_v, mask=m_v, other=0.0)
        decay *= tl.load(decays + i)
        i += step
    return total


@triton.jit
def block_of_events(block_bounds, keys, picks, theta, phi, E, NB, i_b, i_h):
    """Block i_b of head i_h: where its events start and end among the head's sorted events,
    [lo, hi); whether its first row began in an earlier block and whether its last row goes on
    in a later one (a split row, ``sparse_events_kernel``); and the pointers to the head's keys,
    picks, theta and phi."""
    lo = tl.load(block_bounds + i_h * (NB + 1) + i_b)
    hi = tl.load(block_bounds + i_h * (NB + 1) + i_b + 1)
    base = i_h.to(tl.int64) * E
    keys += base
    # the flags of the events at lo and hi - 1 (readable: padded), only where the block has events
    began_before = (hi > lo) & ((tl.load(keys + lo) & 1) == 0)
    goes_on = (hi > lo) & ((tl.load(keys + hi - 1) & 2) == 0)
    return lo, hi, began_before, goes_on, keys, picks + base, theta + base, phi + base


@triton.heuristics(FORWARD_SWITCHES)
@triton.jit
def chunk_sparse_fwd_kernel(
    v,
    keys,
    picks,
    theta,
    phi,
    block_bounds,
    h0,
    ht,
    contributions,
    carries,
    piece_states,
    piece_decays,
    E,
    NB,
    NTILES,
    H: tl.constexpr,
    M: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BP: tl.constexpr,
    BV: tl.constexpr,
    SUMMARY: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    STORE_CARRIES: tl.constexpr,
):
    """v: [tokens, H, V]. keys, picks, theta, phi: [H, E], E = tokens * K, the events of each
    head sorted by key (sequence * M + row), stably in token order: the key shifted left by 2
    over its run's start and end flags (int32), each one's pick as a flat index of [tokens, H, K]
    (int32) and its theta and phi (float32); all four readable ``launch.EVENT_PADDING`` elements
    before and after (the tiles are read unmasked).
    block_bounds: [H, NB + 1] int32, where each program's block of keys starts among the events.
    h0, ht: [N, H, M, V] float32, optional; ht must hold h0 (or zeros) on entry: only the rows
    some token picks are written.
    contributions: [tokens, H, K, V] in v's dtype, phi h after each event, for o = their sum
    over K. carries (optional, for the backward): [H, NTILES, V] float32, NTILES = cdiv(E, BP),
    the memory entering each tile of BP events (aligned to BP among the events, so that two
    programs never store the same tile) after the first tile of each block, and at the first
    tile of a block whose first row began in an earlier block.
    piece_states [H, NB, V], piece_decays [H, NB] float32: a launch with SUMMARY, before the
    one without, writes them for each block whose last row goes on in a later block (a split
    row): that row's memory at the block's end from a zero memory entering the block, and the
    product of its decays in the block (0 where the row starts in it); for an empty block, 0 and
    1. The launch without SUMMARY starts a block whose first row began earlier from the chained
    pieces before it.
    One program per (block of keys, head, block of BV columns)."""
    i_b, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lo, hi, began_before, goes_on, keys, picks, theta, phi = block_of_events(
        block_bounds, keys, picks, theta, phi, E, NB, i_b, i_h
    )
    if STORE_CARRIES:
        carries += i_h.to(tl.int64) * NTILES * V
    piece_states += i_h.to(tl.int64) * NB * V
    piece_decays += i_h * NB
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V

    if SUMMARY:
        state, decay = last_row_piece(v, keys, picks, theta, phi, h0, lo, hi, goes_on, i_h, H, M, K, V, BP, o_v, m_v,
                                      USE_INITIAL_STATE)  # fmt: skip
        # an empty block between the pieces of a row (blocks shorter than a tile) passes it on
        store_piece(piece_states, piece_decays, i_b, state, decay, goes_on | (hi == lo), V, o_v, m_v)
    else:
        h = tl.zeros([BV], dtype=tl.float32)
        if began_before:
            h = chained_state(piece_states, piece_decays, i_b - 1, -1, NB, V, o_v, m_v)
        p0 = lo // BP * BP
        for i in range(tl.cdiv(hi - p0, BP)):
            if STORE_CARRIES:
                if (i > 0) | began_before:
                    tl.store(carries + (p0 // BP) * V + o_v, h, mask=m_v)
            events = ()
            for e in tl.static_range(BP):
                valid, key, first, last, pick, theta_e, phi_e = event_at(keys, picks, theta, phi, p0 + e, lo, hi)
                v_e = at_token(v, pick, valid, K, V, o_v, m_v)
                events = events + ((valid, key, first, last, pick, theta_e, phi_e, v_e),)
            for e in tl.static_range(BP):
                valid, key, first, last, pick, theta_e, phi_e, v_e = events[e]
                h = memory_after(h, h0, key, first, theta_e, v_e, i_h, H, M, V, o_v, m_v, USE_INITIAL_STATE)
                terms = (phi_e * h).to(contributions.dtype.element_ty)
                tl.store(contributions + pick.to(tl.int64) * V + o_v, terms, mask=where_also(m_v, valid))
                if STORE_FINAL_STATE:
                    tl.store(state_row(ht, key, i_h, H, M, V, o_v), h, mask=where_also(m_v, last))
            p0 += BP


@triton.jit
def last_row_piece(
    v, keys, picks, theta, phi, h0, lo, hi, goes_on, i_h, H: tl.constexpr, M: tl.constexpr, K: tl.constexpr,
    V: tl.constexpr, BP: tl.constexpr, o_v, m_v, USE_INITIAL_STATE: tl.constexpr,
):  # fmt: skip
    """Where the block's last row goes on in a later block: that row's memory [BV] at the block's
    end from a zero memory entering the block, sum_k (prod_{i > k} d_i) theta_k v_k over its
    events k in the block (plus the initial state's row times all their d_i where the row starts
    in the block), and its decay, the product of those d_i, or 0 where the row starts in the
    block. Walks the tiles back from the block's end to the row's first event only; elsewhere
    returns zeros and 1."""
    state = tl.zeros(o_v.shape, dtype=tl.float32)
    decay = tl.full([], 1.0, tl.float32)
    found_start = tl.full([], 0, tl.int32)
    walking = goes_on
    p0 = (hi - 1) // BP * BP
    while walking:
        events = ()
        for e in tl.static_range(BP):
            valid, key, first, last, pick, theta_e, phi_e = event_at(keys, picks, theta, phi, p0 + e, lo, hi)
            events = events + ((valid, key, first, theta_e, at_token(v, pick, valid, K, V, o_v, m_v)),)
        for e in tl.static_range(BP - 1, -1, -1):
            valid, key, first, theta_e, v_e = events[e]
            in_row = valid & (found_start == 0)  # not the rows before it
            state += tl.where(in_row, decay * theta_e, 0.0) * v_e.to(tl.float32)
            decay = tl.where(in_row, decay * (1.0 - theta_e), decay)
            starts = in_row & first
            if USE_INITIAL_STATE:
                row = tl.load(state_row(h0, key, i_h, H, M, V, o_v), mask=where_also(m_v, starts), other=0.0)
                state += tl.where(starts, decay, 0.0) * row
            found_start = tl.where(starts, 1, found_start)
        # a block whose first row began before holds no start: its walk ends at lo (aligned)
        walking = (found_start == 0) & (p0 > lo)
        p0 -= BP
    return state, tl.where(found_start == 1, 0.0, decay)


@triton.jit
def first_row_piece(
    do, keys, picks, theta, phi, dht, lo, hi, began_before, i_h, H: tl.constexpr, M: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BP: tl.constexpr, o_v, m_v, USE_FINAL_STATE_GRADIENT: tl.constexpr,
):  # fmt: skip
    """Where the block's first row began in the block before: the gradient [BV] that row passes
    back out of the block from a zero gradient entering it after the block, sum_k (prod_{i <= k}
    d_i) phi_k do_k over its events k in the block (plus the final state gradient's row times all
    their d_i where the row ends in the block), and its decay, the product of those d_i, or 0
    where the row ends in the block. Walks the tiles from lo (aligned) to the row's last event
    only; elsewhere returns zeros and 1."""
    state = tl.zeros(o_v.shape, dtype=tl.float32)
    decay = tl.full([], 1.0, tl.float32)
    found_end = tl.full([], 0, tl.int32)
    walking = began_before
    p0 = lo
    while walking:
        events = ()
        for e in tl.static_range(BP):
            valid, key, first, last, pick, theta_e, phi_e = event_at(keys, picks, theta, phi, p0 + e, lo, hi)
            events = events + ((valid, key, last, theta_e, phi_e, at_token(do, pick, valid, K, V, o_v, m_v)),)
        for e in tl.static_range(BP):
            valid, key, last, theta_e, phi_e, do_e = events[e]
            in_row = valid & (found_end == 0)  # not the rows after it
            decay = tl.where(in_row, decay * (1.0 - theta_e), decay)
            state += tl.where(in_row, decay * phi_e, 0.0) * do_e.to(tl.float32)
            ends = in_row & last
            if USE_FINAL_STATE_GRADIENT:
                row = tl.load(state_row(dht, key, i_h, H, M, V, o_v), mask=where_also(m_v, ends), other=0.0)
                state += tl.where(ends, decay, 0.0) * row
            found_end = tl.where(ends, 1, found_end)
        p0 += BP
        # a block whose last row goes on holds no end past its first row's: its walk ends at hi
        walking = (found_end == 0) & (p0 < hi)
    return state, tl.where(found_end == 1, 0.0, decay)


@triton.jit
def store_piece(states, decays, i_b, state, decay, condition, V: tl.constexpr, o_v, m_v):
    """Block i_b's piece of a split row (``chained_state``), where the scalar condition holds."""
    tl.store(states + i_b * V + o_v, state, mask=where_also(m_v, condition))
    # a one-element store: the interpreter takes no scalar mask
    o_1 = tl.arange(0, 1)
    tl.store(decays + i_b + o_1, decay + tl.zeros([1], dtype=tl.float32), mask=where_also(o_1 == 0, condition))


@triton.heuristics(BACKWARD_SWITCHES)
@triton.jit
def chunk_sparse_bwd_kernel(
    v,
    keys,
    picks,
    theta,
    phi,
    block_bounds,
    h0,
    carries,
    do,
    dht,
    dh0,
    dv_contributions,
    dtheta,
    dphi,
    piece_states,
    piece_decays,
    E,
    NB,
    NTILES,
    H: tl.constexpr,
    M: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BP: tl.constexpr,
    BV: tl.constexpr,
    SUMMARY: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr,
    STORE_INITIAL_STATE_GRADIENT: tl.constexpr,
):
    """As ``chunk_sparse_fwd_kernel``, backward: the same blocks and tiles of BP events, whose
    carries the forward stored (NTILES = cdiv(E, BP)), walked from the last tile back. do:
    [tokens, H, V]; dht: [N, H, M, V] float32, optional. dh0 (optional): [N, H, M, V] float32
    holding dht (or zeros) on entry: only the picked rows are written. dv_contributions:
    [tokens, H, K, V] in v's dtype, theta g at each event, for dv = their sum over K. dtheta,
    dphi: [NV, tokens, H, K] float32, each block of columns' part of the gradients on the picks'
    theta and phi (with NV = 1, the gradients).
    piece_states [H, NB, V], piece_decays [H, NB] float32: a launch with SUMMARY, before the one
    without, writes them for each block whose first row began in the block before (a split row):
    the gradient that row passes back out of the block from a zero gradient entering it after
    the block, and the product of its decays in the block (0 where the row ends in it); for an
    empty block, 0 and 1. That needs do, phi, theta and dht only. The launch without SUMMARY
    starts a block whose last row goes on from the chained pieces after it.

    A tile's loads come first; then forward from the tile's carry, keeping h after each event
    (a tuple of [BV] registers), then back, where the gradient on the memory runs along the row
    as ``grad`` (d_{e+1} g_{e+1}) and restarts at each row's last event. With all V = 256
    columns in one warp (8 a thread) the events' scalar work is done once per row of V, not
    once per block of 64 columns: 1456 -> 957 us at the 340M model's shape (B=4, T=8192, H=4,
    V=256, (1024, 16); 255 registers, no spills), 384 -> 372 us at B=4, T=4096, H=8, V=64
    (H200, benchmarks/ops/NOTES.md, session 20)."""
    i_b, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    lo, hi, began_before, goes_on, keys, picks, theta, phi = block_of_events(
        block_bounds, keys, picks, theta, phi, E, NB, i_b, i_h
    )
    carries += i_h.to(tl.int64) * NTILES * V
    piece_states += i_h.to(tl.int64) * NB * V
    piece_decays += i_h * NB
    n_picks = E * H
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    first_tile = lo // BP * BP
    n_tiles = tl.cdiv(hi - first_tile, BP)
    # dtheta and dphi are stored as one-element tensors: the interpreter takes no scalar mask
    o_1, zero_1 = tl.arange(0, 1), tl.zeros([1], dtype=tl.float32)

    if SUMMARY:
        state, decay = first_row_piece(do, keys, picks, theta, phi, dht, lo, hi, began_before, i_h, H, M, K, V, BP,
                                       o_v, m_v, USE_FINAL_STATE_GRADIENT)  # fmt: skip
        # an empty block between the pieces of a row (blocks shorter than a tile) passes it on
        store_piece(piece_states, piece_decays, i_b, state, decay, began_before | (hi == lo), V, o_v, m_v)
    else:
        grad = tl.zeros([BV], dtype=tl.float32)
        if goes_on:
            grad = chained_state(piece_states, piece_decays, i_b + 1, 1, NB, V, o_v, m_v)
        for t in range(n_tiles):
            p0 = first_tile + (n_tiles - 1 - t) * BP
            # the block's first tile starts a row at lo (the events before it, outside [lo, hi), have
            # theta 0 and leave the memory as it is until then), unless its first row began before
            carry_stored = (p0 > first_tile) | began_before
            carry = tl.load(carries + (p0 // BP) * V + o_v, mask=where_also(m_v, carry_stored), other=0.0)
            events = ()
            for e in tl.static_range(BP):
                valid, key, first, last, pick, theta_e, phi_e = event_at(keys, picks, theta, phi, p0 + e, lo, hi)
                v_e = at_token(v, pick, valid, K, V, o_v, m_v)
                do_e = at_token(do, pick, valid, K, V, o_v, m_v)
                events = events + ((valid, key, first, last, pick, theta_e, phi_e, v_e, do_e),)
            h = carry
            after = ()
            for e in tl.static_range(BP):
                valid, key, first, last, pick, theta_e, phi_e, v_e, do_e = events[e]
                h = memory_after(h, h0, key, first, theta_e, v_e, i_h, H, M, V, o_v, m_v, USE_INITIAL_STATE)
                after = after + (h,)
            for e in tl.static_range(BP - 1, -1, -1):
                valid, key, first, last, pick, theta_e, phi_e, v_e, do_e = events[e]
                if e > 0:
                    before = after[e - 1]
                else:
                    before = carry
                before = state_row_where(before, h0, key, first, i_h, H, M, V, o_v, m_v, USE_INITIAL_STATE)
                grad = state_row_where(grad, dht, key, last, i_h, H, M, V, o_v, m_v, USE_FINAL_STATE_GRADIENT)
                do_e = do_e.to(tl.float32)
                g = phi_e * do_e + grad
                dv_terms = (theta_e * g).to(dv_contributions.dtype.element_ty)
                tl.store(dv_contributions + pick.to(tl.int64) * V + o_v, dv_terms, mask=where_also(m_v, valid))
                at_pick = i_v * n_picks + pick + o_1
                dtheta_e = tl.sum(g * (v_e.to(tl.float32) - before), 0)
                tl.store(dtheta + at_pick, dtheta_e + zero_1, mask=where_also(o_1 == 0, valid))
                tl.store(dphi + at_pick, tl.sum(do_e * after[e], 0) + zero_1, mask=where_also(o_1 == 0, valid))
                grad = (1.0 - theta_e) * g
                if STORE_INITIAL_STATE_GRADIENT:
                    tl.store(state_row(dh0, key, i_h, H, M, V, o_v), grad, mask=where_also(m_v, first))


@triton.heuristics({"IS_VARLEN": lambda args: args["token_sequence"] is not None})
@triton.jit
def sparse_keys_kernel(
    rows,
    token_sequence,
    keys,
    n_picks,
    T,
    head_keys,
    lowest_key,
    H: tl.constexpr,
    K: tl.constexpr,
    M: tl.constexpr,
    BE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The picks' sort keys: from rows [tokens, H, K] int32 (the routing's picks), keys [H,
    tokens, K] = lowest_key + head * head_keys + sequence * M + row in keys' integer dtype. A
    token's sequence is token // T, or with IS_VARLEN token_sequence[token] (any integer dtype)."""
    o_e = tl.program_id(0).to(tl.int64) * BE + tl.arange(0, BE)
    m_e = o_e < n_picks
    token, head = o_e // (H * K), o_e // K % H
    if IS_VARLEN:
        sequence = tl.load(token_sequence + token, mask=m_e, other=0).to(tl.int64)
    else:
        sequence = token // T
    key = lowest_key + head * head_keys + sequence * M + tl.load(rows + o_e, mask=m_e, other=0)
    tl.store(keys + (head * (n_picks // (H * K)) + token) * K + o_e % K, key.to(keys.dtype.element_ty), mask=m_e)


@triton.jit
def sparse_events_kernel(
    order,
    sorted_keys,
    eta,
    mu,
    alpha,
    keys,
    picks,
    theta,
    phi,
    block_bounds,
    E,
    n_events,
    head_keys,
    lowest_key,
    n_keys,
    NB,
    search_steps,
    H: tl.constexpr,
    K: tl.constexpr,
    S: tl.constexpr,
    BP: tl.constexpr,
    BE: tl.constexpr,
):
    """The picks as events, from one stable sort of all heads' keys (``sparse_keys_kernel``'s,
    flat over [H, tokens, K]): sorted_keys and order (the position each came from), [H E] each.
    Head h's events fill positions [h E, (h + 1) E), as its keys are below the next head's.
    Writes, [H, E] each in sorted order: keys without the offsets (sequence * M + row) shifted
    left by 2 over two flags, bit 0 where the event starts its row's run and bit 1 where it ends
    it (int32), each event's pick as a flat index of [tokens, H, K] (int32), and its theta =
    eta * alpha and phi = mu * alpha (float32; eta, mu [tokens, H], alpha [tokens, H, K] float32).
    The first cdiv(H (NB + 1), BE) programs write block_bounds [H, NB + 1] int32 instead: block
    j of a head starts where the row holding its event j S starts, unless that row also holds
    event (j - 1) S: then at the tile of BP events that holds event j S, if it starts after the
    row (a split row); its last block ends where the keys of tokens past the last sequence
    (key >= n_keys, outside the contract) begin, or at E. Each start is found by a binary search
    of at most ``search_steps`` >= log2(E + 1) steps. They need only the sorted keys, so they
    run beside the others, one search per lane."""
    i_p = tl.program_id(0)
    n_bound_programs = tl.cdiv(H * (NB + 1), BE)
    if i_p < n_bound_programs:
        o_b = i_p.to(tl.int64) * BE + tl.arange(0, BE)
        m_b = o_b < H * (NB + 1)
        head, j = o_b // (NB + 1), o_b % (NB + 1)
        end_key = lowest_key + head * head_keys + n_keys
        at = tl.load(sorted_keys + head * E + j * S, mask=m_b & (j < NB), other=0).to(tl.int64)
        target = tl.where(j < NB, tl.minimum(at, end_key), end_key)
        # the first sorted key >= target lies at most at j S, and after (j - 1) S unless a row
        # as long as S (a hot row) spans both, or (j - 1) S is past the last sequence: in the
        # other lanes the search ends (lo = hi) after log2(S) of the steps
        lo, hi = head * E, head * E + tl.minimum(j * S, E)
        before = tl.maximum(hi - S, lo)
        previous = tl.load(sorted_keys + before, mask=m_b & (j > 0), other=0).to(tl.int64)
        lo = tl.where((j > 0) & (previous < target), before + 1, lo)
        # a row that holds events (j - 1) S and j S is split at the tile that holds event j S, where
        # that tile starts after the row does: no block is much longer than 2 S events. The row
        # starts at or before (j - 1) S, so past that the split is certain and needs no search,
        # which would take all log2(E) steps in those lanes (hot rows)
        tile_start = j * S // BP * BP
        spans = (j > 0) & (j < NB) & (at < end_key) & (previous == at)
        certain = spans & (head * E + tile_start > before)
        hi = tl.where(certain, lo, hi)
        for _ in range(search_steps):
            active = m_b & (lo < hi)
            mid = (lo + hi) // 2
            below = tl.load(sorted_keys + mid, mask=active, other=0).to(tl.int64) < target
            lo = tl.where(active & below, mid + 1, lo)
            hi = tl.where(active & ~below, mid, hi)
        row_start = lo - head * E
        split = certain | (spans & (tile_start > row_start))
        tl.store(block_bounds + o_b, tl.where(split, tile_start, row_start).to(tl.int32), mask=m_b)
    else:
        o_e = (i_p - n_bound_programs).to(tl.int64) * BE + tl.arange(0, BE)
        m_e = o_e < n_events
        head = o_e // E
        source = tl.load(order + o_e, mask=m_e, other=0) - head * E
        token = source // K
        pick = (token * H + head) * K + source % K
        a = tl.load(alpha + pick, mask=m_e, other=0.0)
        eta_e = tl.load(eta + token * H + head, mask=m_e, other=0.0).to(tl.float32)
        mu_e = tl.load(mu + token * H + head, mask=m_e, other=0.0).to(tl.float32)
        sorted_key = tl.load(sorted_keys + o_e, mask=m_e, other=0)
        in_head = o_e - head * E
        first = (in_head == 0) | (tl.load(sorted_keys + o_e - 1, mask=m_e & (in_head > 0), other=0) != sorted_key)
        last = (in_head == E - 1) | (
            tl.load(sorted_keys + o_e + 1, mask=m_e & (in_head < E - 1), other=0) != sorted_key
        )
        key = sorted_key.to(tl.int64) - lowest_key - head * head_keys
        packed = key * 4 + first.to(tl.int64) + 2 * last.to(tl.int64)
        tl.store(keys + o_e, packed.to(tl.int32), mask=m_e)
        tl.store(picks + o_e, pick.to(tl.int32), mask=m_e)
        tl.store(theta + o_e, eta_e * a, mask=m_e)
        tl.store(phi + o_e, mu_e * a, mask=m_e)


@triton.jit
def sum_over_picks_kernel(
    x, y, n_rows, K: tl.constexpr, V: tl.constexpr, BR: tl.constexpr, KB: tl.constexpr, BV: tl.constexpr
):
    """y [n_rows, V] = the sum over its K picks of x [n_rows, K, V], added in float32 (x and y
    in any float dtype). [BR, KB, BV] tiles, KB picks at a time."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_k = tl.arange(0, KB)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    m_rv = (o_r < n_rows)[:, None] & (o_v < V)[None, :]
    rows = o_r.to(tl.int64)[:, None, None] * K * V + o_v[None, None, :]
    total = tl.zeros([BR, BV], dtype=tl.float32)
    for k0 in range(0, K, KB):
        m = m_rv[:, None, :] & (k0 + o_k < K)[None, :, None]
        total += tl.sum(tl.load(x + rows + (k0 + o_k)[None, :, None] * V, mask=m, other=0.0).to(tl.float32), 1)
    tl.store(y + o_r.to(tl.int64)[:, None] * V + o_v[None, :], total.to(y.dtype.element_ty), mask=m_rv)
