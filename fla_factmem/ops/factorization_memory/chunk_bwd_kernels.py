"""Triton backward kernels of dense Factorization Memory, parallel over chunks.

With the memory at every chunk's start h (saved by the forward) and the gradient on the memory
at every chunk's end dh (``launch.chunk_states`` in reverse: the scan, or the walk), the
gradients are, per row j and token t of a chunk, with D_t the gradient on h_t:

    dphi_t[j]   = <do_t, h_t[j]>
    dtheta_t[j] = <D_t[j], v_t> - <D_t[j], h_{t-1}[j]>
    dv_t        = sum_j theta_t[j] D_t[j]

The intra-chunk pairs go through the same levels as the forward's scores (running products of
the decays d = 1 - theta, matrix products only). The decay term <D_t, h_{t-1}> comes from the
gradient dg_t = d_t dL/dd_t = (1 - theta_t) <D_t, h_{t-1}>, a suffix sum over the chunk (as
in GLA), divided by 1 - theta_t. That division loses every digit as theta -> 1, so the one row per
token that can have theta > 1/2 (sum_j theta_t[j] = eta_t <= 1; ``logsumexp_kernel`` finds
it) is computed directly instead, from its own row of h and dh. The chain rule through
theta = eta * alpha, phi = mu * alpha and the softmax gives the gradients on logits, eta and mu;
there, a token's row with alpha > 3/4, if it has one (``is_top_row``), gets minus the sum of
the others' gradients on the logits, as computed directly it is a difference of nearly equal
numbers.

Three kernels, so that none holds more than a few [BT, BT] tiles:
1. ``chunk_bwd_dominant_kernel``: <D_t[j], h_{t-1}[j]> for the dominant rows (most chunks have
   none), and for the levels of kernel 2 each chunk's pair products <do_t, v_s>, which every
   block of rows reads.
2. Per (chunk, head, block of rows): dphi, dtheta, and from them the gradient on alpha; the
   gradients on logits, eta and mu when one block holds all M rows. In one of two forms
   (``launch.dqk_walks``): ``chunk_bwd_dqk_kernel`` forms the intra-chunk pairs by levels, with
   matrix products; ``chunk_bwd_dqk_walk_kernel`` walks the chunk token by token, forward for
   h_t and back for D_t, element-wise in float32 with no [BT, BT] tiles at all: BT * V
   multiply-adds a row and token each way, which beat the levels' [BT, BT] products
   only while V is small.
3. ``chunk_bwd_dv_kernel``, per (chunk, head): dv, from the intra-chunk scores the forward
   stored, and with several blocks of rows the softmax backward over whole rows from kernel 2's
   scratch.
"""

import triton
import triton.language as tl

from fla_factmem.ops.factorization_memory.chunk_kernels import (
    VARLEN_SWITCH,
    chunk_coordinates,
    chunk_gates,
    chunk_positions,
    chunk_tokens,
    level_pairs,
    level_product,
    next_level_factors,
    product,
    routing_gates,
    routing_weight,
)


@triton.jit
def is_top_row(alpha):
    """Where alpha [BT, BM] exceeds 3/4: at most one row per token, as a token's alphas sum to 1.
    The softmax backward gives that row's gradient on the logits as minus the sum of the others'
    (the gradient sums to 0). Computed directly, alpha (dalpha - sum_j alpha_j dalpha_j) is a
    difference of nearly equal numbers as alpha -> 1 (near one-hot routing): in float32 it came
    out 2% off at alpha = 1 - 1.2e-4, where the other rows' gradients were within 1e-5. An error e in the
    sum costs the direct value alpha e and the others' sum (1 - alpha) e, so any threshold above
    1/2 gains. 3/4, not 1/2, leaves a margin for rounding: two rows of one token never both pass,
    so neither path needs a search for the largest. ``dominant`` rows (theta > 1/2, the forward's
    ``logsumexp_kernel``) are the same idea for the decays."""
    return alpha > 0.75


@triton.jit
def dominant_row_products(
    v_t, do_t, logits, lse, eta, mu, states, grad_states, tok, m_t, m_next, j_dom, state_row0,
    H: tl.constexpr, M: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """<D_t[j], h_{t-1}[j]> for the dominant row j = j_dom[t] of each token of the chunk that has
    one, else 0: [BT]. The [x, t] tiles hold row j_dom[t] at token x, gathered from the gates."""
    o_t = tl.arange(0, BT)
    o_v = tl.arange(0, BV)
    has = j_dom >= 0
    j = tl.maximum(j_dom, 0)
    gates = (logits, lse, eta, mu)
    theta, phi, d = chunk_gates(*gates, tok, m_t, j, has, M)
    _, _, d_next = chunk_gates(*gates, tok + H, m_next, j, has, M)
    x_i, t_i = o_t[:, None], o_t[None, :]
    rows = (state_row0 + j)[:, None] * V + o_v[None, :]
    m_rows = has[:, None] & (o_v < V)[None, :]

    # h_{t-1}[j] = d_1 ... d_{t-1} h[j] + sum_{s<t} theta_s d_{s+1} ... d_{t-1} v_s
    decay_start = product(tl.where(x_i < t_i, d, 1.0), 0)
    gaps = tl.cumprod(tl.where(x_i + 1 < t_i, d_next, 1.0), 0, reverse=True)
    w_before = tl.where(x_i < t_i, theta * gaps, 0.0)
    h_j = tl.load(states + rows, mask=m_rows, other=0.0).to(tl.float32)
    h_prev = tl.dot(tl.trans(w_before), v_t, decay_start[:, None] * h_j, input_precision=DOT_PRECISION)

    # D_t[j] = d_{t+1} ... d_last dh[j] + sum_{u>=t} phi_u d_{t+1} ... d_u do_u
    d_after = tl.where(x_i > t_i, d, 1.0)
    decay_end = product(d_after, 0)
    w_after = tl.where(x_i >= t_i, phi * tl.cumprod(d_after, 0), 0.0)
    dh_j = tl.load(grad_states + rows, mask=m_rows, other=0.0).to(tl.float32)
    grad_j = tl.dot(tl.trans(w_after), do_t, decay_end[:, None] * dh_j, input_precision=DOT_PRECISION)
    return tl.sum(grad_j * h_prev, 1)


@triton.jit
def partial_sum_ptrs(partial_sums, k, i_m, tok, n_entries, NM: tl.constexpr):
    """Where the tokens tok's k-th sum over block i_m's rows (k = 0: alpha * dphi, 1: alpha *
    dtheta, 2: alpha * dalpha) lies in partial_sums [3, NM, n_entries]. The offsets are int64:
    3 NM n_entries passes 2^31 at large B * T * H."""
    return partial_sums + tl.cast(k * NM + i_m, tl.int64) * n_entries + tok


@triton.heuristics(VARLEN_SWITCH | {"STORE_PAIRS": lambda args: args["pair_products"] is not None})
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_bwd_dominant_kernel(
    v,
    logits,
    lse,
    eta,
    mu,
    dominant,
    do,
    states,
    grad_states,
    pair_products,
    x_dom,
    chunk_indices,
    cu_seqlens,
    T,
    NT,
    H: tl.constexpr,
    M: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STORE_PAIRS: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """pair_products (STORE_PAIRS, for ``chunk_bwd_dqk_kernel``): [B, T, H, BT] float32, row t
    holds <do_t, v_s> for the tokens s of t's chunk (0 past the sequence's end). x_dom: [B, T, H]
    float32, <D_t[j], h_{t-1}[j]> at the tokens with a dominant row j (dominant[t] >= 0), 0 at the
    others: written for every token, so that the dq/dk walk can load it a token ahead without
    waiting for the token's dominant row first."""
    i_tc, i_h = tl.program_id(0), tl.program_id(1)
    tok, m_t, m_next = chunk_tokens(chunk_indices, cu_seqlens, i_tc, i_h, T, NT, H, BT, IS_VARLEN)
    o_v = tl.arange(0, BV)
    tokens = tok[:, None] * V + o_v[None, :]
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    if STORE_PAIRS:
        v_t = tl.load(v + tokens, mask=m_tv, other=0.0).to(tl.float32)
        do_t = tl.load(do + tokens, mask=m_tv, other=0.0).to(tl.float32)
        do_v = tl.dot(do_t, tl.trans(v_t), input_precision=DOT_PRECISION)
        tl.store(pair_products + tok[:, None] * BT + tl.arange(0, BT)[None, :], do_v, mask=m_t[:, None])
    j_dom = tl.load(dominant + tok, mask=m_t, other=-1)
    x = tl.zeros([BT], dtype=tl.float32)
    if tl.max(j_dom, 0) >= 0:
        # loaded again under STORE_PAIRS (from the cache): Triton takes no tensor defined in one
        # branch into another
        v_t = tl.load(v + tokens, mask=m_tv, other=0.0).to(tl.float32)
        do_t = tl.load(do + tokens, mask=m_tv, other=0.0).to(tl.float32)
        state_row0 = (i_tc.to(tl.int64) * H + i_h) * M
        x = dominant_row_products(
            v_t, do_t, logits, lse, eta, mu, states, grad_states, tok, m_t, m_next, j_dom, state_row0,
            H, M, V, BT, BV, DOT_PRECISION,
        )  # fmt: skip
    tl.store(x_dom + tok, x, mask=m_t)


@triton.jit
def dominant_row_terms(dominant, x_dom, tok, m_t):
    """The tokens' dominant row (-1 where none) and their x_dom (``chunk_bwd_dominant_kernel``),
    as loaded, in tok's shape."""
    return tl.load(dominant + tok, mask=m_t, other=-1), tl.load(x_dom + tok, mask=m_t, other=0.0)


@triton.jit
def store_row_gradients(
    alpha, theta, dphi, dk, dg, eta_t, mu_t, j_dom, x, tok, m_t, o_m, m_m, i_m,
    dlogits, deta, dmu, dalpha, partial_sums, n_entries, M: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    """The end of the dq/dk kernels, for a block of rows (the last axis) of one token (tok, m_t,
    j_dom and x [1], eta_t and mu_t scalars, the rest [BM]) or of a chunk's tokens ([BT] and
    [BT, BM]): from dphi, dk = <D_t, v_t> and dg = (1 - theta) <D_t, h_{t-1}>, dtheta (with the
    ``dominant_row_terms`` j_dom and x); then the gradients on logits, eta and mu when the block
    holds all M rows, else dalpha and the block's partial sums, which ``chunk_bwd_dv_kernel``
    finishes (``chunk_bwd_dqk_kernel``'s docstring gives their layouts)."""
    is_dom = o_m == tl.expand_dims(j_dom, -1)
    dtheta = dk - tl.where(is_dom, tl.expand_dims(x, -1), dg / tl.where(is_dom, 1.0, 1.0 - theta))
    rows = tl.expand_dims(tok, -1) * M + o_m
    m_rows = tl.expand_dims(m_t, -1) & m_m
    dalpha_t = tl.expand_dims(mu_t, -1) * dphi + tl.expand_dims(eta_t, -1) * dtheta
    dmu_t = tl.sum(alpha * dphi, -1)
    deta_t = tl.sum(alpha * dtheta, -1)
    if M <= BM:
        total = mu_t * dmu_t + eta_t * deta_t  # sum_j alpha dalpha
        grad = alpha * (dalpha_t - tl.expand_dims(total, -1))
        top = is_top_row(alpha)
        grad = tl.where(top, -tl.expand_dims(tl.sum(tl.where(top, 0.0, grad), -1), -1), grad)
        tl.store(dlogits + rows, grad.to(dlogits.dtype.element_ty), mask=m_rows)
        tl.store(deta + tok, deta_t.to(deta.dtype.element_ty), mask=m_t)
        tl.store(dmu + tok, dmu_t.to(dmu.dtype.element_ty), mask=m_t)
    else:
        tl.store(dalpha + rows, dalpha_t, mask=m_rows)
        NM: tl.constexpr = (M + BM - 1) // BM
        tl.store(partial_sum_ptrs(partial_sums, 0, i_m, tok, n_entries, NM), dmu_t, mask=m_t)
        tl.store(partial_sum_ptrs(partial_sums, 1, i_m, tok, n_entries, NM), deta_t, mask=m_t)
        # the block's part of the softmax's sum_j alpha dalpha, from the very values stored
        tl.store(partial_sum_ptrs(partial_sums, 2, i_m, tok, n_entries, NM), tl.sum(alpha * dalpha_t, -1), mask=m_t)


@triton.heuristics(VARLEN_SWITCH)
@triton.jit(do_not_specialize=["T", "NT", "n_entries"])
def chunk_bwd_dqk_kernel(
    v,
    logits,
    lse,
    eta,
    mu,
    dominant,
    x_dom,
    do,
    states,
    grad_states,
    pair_products,
    dlogits,
    deta,
    dmu,
    dalpha,
    partial_sums,
    chunk_indices,
    cu_seqlens,
    T,
    NT,
    n_entries,
    H: tl.constexpr,
    M: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    LEVELS: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """states: [NT_total, H, M, V] memory at each chunk's start; grad_states: [NT_total, H, M, V]
    gradient on the memory at each chunk's end from the tokens after it (both
    ``launch.chunk_state_dtype``); pair_products: [B, T, H, BT] float32 from
    ``chunk_bwd_dominant_kernel``. One block of BM rows per program. When it holds all M rows:
    writes dlogits, deta and dmu in their inputs' layouts. Else: dalpha [B, T, H, M] float32 and
    partial_sums [3, NM, n_entries] float32 (n_entries = B * T * H), the block's sums of
    alpha * dphi, alpha * dtheta and alpha * dalpha, for ``chunk_bwd_dv_kernel`` to finish."""
    i_tc, i_h, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tok, m_t, m_next = chunk_tokens(chunk_indices, cu_seqlens, i_tc, i_h, T, NT, H, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    row = (i_tc.to(tl.int64) * H + i_h) * M + o_m

    alpha, theta, phi, d, eta_t, mu_t = routing_gates(logits, lse, eta, mu, tok, m_t, o_m, m_m, M, True)
    _, _, d_next = chunk_gates(logits, lse, eta, mu, tok + H, m_next, o_m, m_m, M)
    decay_out = tl.cumprod(d_next, 0, reverse=True)
    w_end = theta * decay_out
    decay_all = product(d, 0)
    # everything below contracts over V: blocks of BV columns, so that the [BV, BM] tiles of the
    # states stay in registers at V = 256
    dq = tl.zeros([BT, BM], dtype=tl.float32)
    dk = tl.zeros([BT, BM], dtype=tl.float32)
    dh_h_end = tl.zeros([BM], dtype=tl.float32)  # <dh, h_end>, of the suffix sum below
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        v_t = tl.load(v + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        do_t = tl.load(do + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        m_vm = m_v[:, None] & m_m[None, :]
        hT = tl.load(states + row[None, :] * V + o_v[:, None], mask=m_vm, other=0.0).to(tl.float32)  # [BV, BM]
        dhT = tl.load(grad_states + row[None, :] * V + o_v[:, None], mask=m_vm, other=0.0).to(tl.float32)
        dq = tl.dot(do_t, hT, dq, input_precision=DOT_PRECISION)
        dk = tl.dot(v_t, dhT, dk, input_precision=DOT_PRECISION)
        hT_end = tl.dot(tl.trans(v_t), w_end, hT * decay_all[None, :], input_precision=DOT_PRECISION)
        dh_h_end += tl.sum(dhT * hT_end, 0)
    # the chunk's <do_t, v_s>, formed once for all blocks of rows; the transposed tile is loaded
    # transposed (Triton 3.6 miscompiles a transposed dot accumulator on Hopper)
    do_v = tl.load(pair_products + tok[:, None] * BT + o_t[None, :], mask=m_t[:, None], other=0.0)  # [t, s]
    v_do = tl.load(pair_products + tok[None, :] * BT + o_t[:, None], mask=m_t[None, :], other=0.0)  # [s, t]
    do_v_own = tl.load(pair_products + tok * BT + o_t, mask=m_t, other=0.0)
    # the chunk's start and end through every token, and within it the pairs of each level
    dq = tl.cumprod(d, 0) * dq + do_v_own[:, None] * theta
    dk = decay_out * dk + do_v_own[:, None] * phi
    qx, kx = d, tl.full([BT, BM], 1.0, tl.float32)
    for l in tl.static_range(LEVELS):
        pairs = level_pairs(o_t[:, None], o_t[None, :], 1 << l)  # [t, s]
        pairs_t = level_pairs(o_t[None, :], o_t[:, None], 1 << l)  # [s, t]
        dq += qx * level_product(tl.where(pairs, do_v, 0.0), theta * kx, DOT_PRECISION)
        dk += kx * level_product(tl.where(pairs_t, v_do, 0.0), phi * qx, DOT_PRECISION)
        if l + 1 < LEVELS:  # the last step would give tl.cumprod(d, 0) and decay_out again
            qx, kx = next_level_factors(qx, kx, d, 1 << l, BT, BM)

    # dg_t = (1 - theta_t) <D_t, h_{t-1}>: the suffix sum of phi dq - theta dk plus <dh, h_end>
    dg = tl.cumsum(phi * dq - theta * dk, 0, reverse=True) + dh_h_end[None, :]
    j_dom, x = dominant_row_terms(dominant, x_dom, tok, m_t)
    store_row_gradients(
        alpha, theta, dq, dk, dg, eta_t, mu_t, j_dom, x, tok, m_t, o_m, m_m, i_m,
        dlogits, deta, dmu, dalpha, partial_sums, n_entries, M, BM,
    )  # fmt: skip


@triton.jit
def token_loads(logits, lse, eta, mu, v, do, tk, o_m, m_m, o_v, m_v, M: tl.constexpr, V: tl.constexpr):
    """One token's inputs to the walk, as loaded (tk its flat (token, head) index): its logits over
    rows o_m, log-sum-exp, eta, mu, and v and do over columns o_v [SLICES, W]."""
    x = tl.load(logits + tk * M + o_m, mask=m_m, other=float("-inf"))
    top = tl.load(lse + 2 * tk)
    log_total = tl.load(lse + 2 * tk + 1)
    v_t = tl.load(v + tk * V + o_v, mask=m_v, other=0.0)
    do_t = tl.load(do + tk * V + o_v, mask=m_v, other=0.0)
    return x, top, log_total, tl.load(eta + tk), tl.load(mu + tk), v_t, do_t


@triton.jit
def back_row_loads(dalpha, dominant, x_dom, tk, o_m, m_m, M: tl.constexpr):
    """What the walk's back step reads of token tk besides its inputs: dphi, which the forward
    walk left in dalpha [BM], and the ``dominant_row_terms`` [1]. The back step loads them a token
    ahead, as its inputs (``token_loads``), rather than where it uses them: there each load was
    waited for in full, and x_dom only once the dominant row had come."""
    j_dom, x = dominant_row_terms(dominant, x_dom, tk[None], tl.full([1], True, tl.int1))
    return tl.load(dalpha + tk * M + o_m, mask=m_m, other=0.0), j_dom, x


@triton.jit
def as_row_tile(x):
    """[1, SLICES, W] float32 of a token's columns x [SLICES, W], for the walk's rows to broadcast along."""
    return x.to(tl.float32)[None, :, :]


@triton.jit
def sum_over_columns(x):
    """[BM]: the sums over each row's columns of x [BM, SLICES, W]."""
    return tl.sum(tl.sum(x, 2), 1)


@triton.heuristics(VARLEN_SWITCH)
@triton.jit(do_not_specialize=["T", "NT", "n_entries"])
def chunk_bwd_dqk_walk_kernel(
    v,
    logits,
    lse,
    eta,
    mu,
    dominant,
    x_dom,
    do,
    states,
    grad_states,
    dlogits,
    deta,
    dmu,
    dalpha,
    partial_sums,
    chunk_indices,
    cu_seqlens,
    T,
    NT,
    n_entries,
    H: tl.constexpr,
    M: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    SLICES: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """states: [NT_total, H, M, V] memory at each chunk's start; grad_states: [NT_total, H, M, V]
    gradient on the memory at each chunk's end from the tokens after it (both
    ``launch.chunk_state_dtype``). One block of BM rows per program, all V columns: it walks its
    chunk token by token, forward for dphi_t = <do_t, h_t> and back for dtheta, element-wise in
    float32, its columns in SLICES slices of BV / SLICES (``launch.walk_slices``); with one warp
    (the default launch) each row's sums over V stay within it. dalpha: [B, T, H, M] float32, the
    forward walk's dphi, then (several blocks of rows) dalpha; partial_sums [3, NM, n_entries]
    float32 (n_entries = B * T * H), the block's sums of alpha * dphi, alpha * dtheta and alpha *
    dalpha, for ``chunk_bwd_dv_kernel`` to finish. When one block holds all M rows it writes
    dlogits, deta and dmu in their inputs' layouts instead."""
    i_tc, i_h, i_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, i_c, bos, eos = chunk_coordinates(i_tc, chunk_indices, cu_seqlens, T, NT, IS_VARLEN)
    first = bos + i_c * BT
    n = tl.minimum(eos - first, BT).to(tl.int32)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    # the tiles are [BM, SLICES, BV / SLICES]: a row's columns in slices, which in one warp (the
    # default launch) each thread holds its columns of, so that fewer threads share a row than
    # in a [BM, BV] tile (whose layout the states' 16-byte loads fix): fewer shuffles a sum over
    # V and fewer threads forming each row's gates, for more of v_t and do_t converted in each
    # (``launch.walk_slices``). Keep the third axis at one slice too: at 32 rows in one warp
    # Triton 3.6 then forms the gates one row a thread and moves them through shared memory,
    # where for [BM, BV] tiles it formed them in each of the 8 threads sharing a row, for 19%
    # more instructions a step (benchmarks/ops/NOTES.md, session 39)
    tl.static_assert(SLICES <= BV, "the walk's column slices must be at least one column wide")
    W: tl.constexpr = BV // SLICES
    o_v = tl.arange(0, SLICES)[:, None] * W + tl.arange(0, W)[None, :]  # [SLICES, W]
    m_v = o_v < V
    rows = ((i_tc.to(tl.int64) * H + i_h) * M + o_m)[:, None, None] * V + o_v[None, :, :]
    m_rows = m_m[:, None, None] & m_v[None, :, :]
    inputs = (logits, lse, eta, mu, v, do)
    # each step loads the next token's inputs before it works on its own, so that the loads'
    # latency overlaps a step's arithmetic; the last step loads its own token again rather than
    # one past the chunk

    # forward: h_t = d_t h_{t-1} + theta_t v_t from the chunk's start, dphi_t = <do_t, h_t>
    h = tl.load(states + rows, mask=m_rows, other=0.0).to(tl.float32)
    tk = first * H + i_h
    x, top, log_total, eta_t, mu_t, v_t, do_t = token_loads(*inputs, tk, o_m, m_m, o_v, m_v, M, V)
    for t in range(n):
        nxt = token_loads(*inputs, tk + tl.where(t + 1 < n, H, 0), o_m, m_m, o_v, m_v, M, V)
        theta = eta_t.to(tl.float32) * routing_weight(x, top, log_total)
        h = (1.0 - theta)[:, None, None] * h + theta[:, None, None] * as_row_tile(v_t)
        tl.store(dalpha + tk * M + o_m, sum_over_columns(h * as_row_tile(do_t)), mask=m_m)
        tk += H
        x, top, log_total, eta_t, mu_t, v_t, do_t = nxt
    tl.debug_barrier()  # the back walk reads dphi where other threads of the row stored it

    # back: D_t = phi_t do_t + d_{t+1} D_{t+1} from the chunk's end, dk_t = <D_t, v_t>, and
    # dg_t = (1 - theta_t) <D_t, h_{t-1}> = phi_t dphi_t - theta_t dk_t + dg_{t+1} from <dh, h_end>
    grad_h = tl.load(grad_states + rows, mask=m_rows, other=0.0).to(tl.float32)
    dg = sum_over_columns(grad_h * h)
    d_after = tl.full([BM], 1.0, dtype=tl.float32)
    tk = (first + n - 1) * H + i_h
    x, top, log_total, eta_t, mu_t, v_t, do_t = token_loads(*inputs, tk, o_m, m_m, o_v, m_v, M, V)
    dphi, j_dom, x_j = back_row_loads(dalpha, dominant, x_dom, tk, o_m, m_m, M)
    for i in range(n):
        tk_next = tk - tl.where(i + 1 < n, H, 0)
        nxt = token_loads(*inputs, tk_next, o_m, m_m, o_v, m_v, M, V)
        rows_next = back_row_loads(dalpha, dominant, x_dom, tk_next, o_m, m_m, M)
        alpha = routing_weight(x, top, log_total)
        eta_t = eta_t.to(tl.float32)
        mu_t = mu_t.to(tl.float32)
        theta = eta_t * alpha
        phi = mu_t * alpha
        grad_h = d_after[:, None, None] * grad_h + phi[:, None, None] * as_row_tile(do_t)
        dk = sum_over_columns(grad_h * as_row_tile(v_t))
        dg += phi * dphi - theta * dk
        if M > BM:
            # dalpha_t overwrites dphi_t: with several warps, one warp's store must not overtake
            # another's load, made a step before (1 warp by default, launch.chunk_bwd)
            tl.debug_barrier()
        # the token as [1] tensors: the interpreter takes no 0-d mask where it broadcasts
        store_row_gradients(
            alpha, theta, dphi, dk, dg, eta_t, mu_t, j_dom, x_j, tk[None], tl.full([1], True, tl.int1), o_m, m_m, i_m,
            dlogits, deta, dmu, dalpha, partial_sums, n_entries, M, BM,
        )  # fmt: skip
        d_after = 1.0 - theta
        tk = tk_next
        x, top, log_total, eta_t, mu_t, v_t, do_t = nxt
        dphi, j_dom, x_j = rows_next


@triton.heuristics(VARLEN_SWITCH)
@triton.jit(do_not_specialize=["T", "NT", "n_entries"])
def chunk_bwd_dv_kernel(
    logits,
    lse,
    eta,
    mu,
    do,
    grad_states,
    scores,
    dv,
    dlogits,
    deta,
    dmu,
    dalpha,
    partial_sums,
    chunk_indices,
    cu_seqlens,
    T,
    NT,
    n_entries,
    H: tl.constexpr,
    M: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """dv_s = sum_j theta_s[j] d_{s+1}[j] ... d_last[j] dh[j] + sum_{t>=s} A[t, s] do_t, over
    blocks of BM rows, with A the forward's scores (``scores`` [B, T, H, BT] float32, row t of
    its chunk's A). With several blocks (M > BM), also the softmax backward from the dq/dk
    kernel's dalpha and partial sums (either form): dlogits, deta, dmu."""
    i_tc, i_h = tl.program_id(0), tl.program_id(1)
    # tokens last first, for w_out's forward scan (``chunk_positions``); the dots over tokens do
    # not depend on their order, and the scores' columns are indexed by the same positions
    tok, m_t, m_next = chunk_tokens(chunk_indices, cu_seqlens, i_tc, i_h, T, NT, H, BT, IS_VARLEN, True)
    o_t = chunk_positions(BT, True)
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    state_row0 = (i_tc.to(tl.int64) * H + i_h) * M
    gates = (logits, lse, eta, mu)
    dv_acc = tl.zeros([BT, BV], dtype=tl.float32)
    for i_m in range(tl.cdiv(M, BM)):
        o_m = i_m * BM + tl.arange(0, BM)
        m_m = o_m < M
        theta, _, _ = chunk_gates(*gates, tok, m_t, o_m, m_m, M)
        _, _, d_next = chunk_gates(*gates, tok + H, m_next, o_m, m_m, M)
        row = state_row0 + o_m
        m_state = m_m[:, None] & m_v[None, :]
        dh = tl.load(grad_states + row[:, None] * V + o_v[None, :], mask=m_state, other=0.0).to(tl.float32)
        w_out = theta * tl.cumprod(d_next, 0)
        dv_acc = tl.dot(w_out, dh, dv_acc, input_precision=DOT_PRECISION)
    # [s, t]: A[t, s], loaded transposed (token t's row holds A[t, :])
    scores_t = tl.load(scores + tok[None, :] * BT + o_t[:, None], mask=m_t[None, :], other=0.0)
    m_tv = m_t[:, None] & m_v[None, :]
    do_t = tl.load(do + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
    dv_t = tl.dot(scores_t, do_t, dv_acc, input_precision=DOT_PRECISION)
    tl.store(dv + tok[:, None] * V + o_v[None, :], dv_t.to(dv.dtype.element_ty), mask=m_tv)

    if M > BM:
        NM: tl.constexpr = (M + BM - 1) // BM
        # plain loops: in tl.range with 3 stages (their loads as async copies) the kernel took 317 us
        # against 270 at M=256 on an H100 (benchmarks/ops/NOTES.md, session 46)
        dmu_t = tl.zeros([BT], dtype=tl.float32)
        deta_t = tl.zeros([BT], dtype=tl.float32)
        total = tl.zeros([BT], dtype=tl.float32)  # sum_j alpha dalpha
        for i_m in range(NM):
            dmu_t += tl.load(partial_sum_ptrs(partial_sums, 0, i_m, tok, n_entries, NM), mask=m_t, other=0.0)
            deta_t += tl.load(partial_sum_ptrs(partial_sums, 1, i_m, tok, n_entries, NM), mask=m_t, other=0.0)
            total += tl.load(partial_sum_ptrs(partial_sums, 2, i_m, tok, n_entries, NM), mask=m_t, other=0.0)
        tl.store(deta + tok, deta_t.to(deta.dtype.element_ty), mask=m_t)
        tl.store(dmu + tok, dmu_t.to(dmu.dtype.element_ty), mask=m_t)
        # the top row (is_top_row), if a token has one, is stored last, as minus the others' sum
        others = tl.zeros([BT], dtype=tl.float32)
        top_row = tl.full([BT], -1, dtype=tl.int32)
        for i_m in range(NM):
            o_m = i_m * BM + tl.arange(0, BM)
            m_tm = m_t[:, None] & (o_m < M)[None, :]
            alpha, _, _, _, _, _ = routing_gates(logits, lse, eta, mu, tok, m_t, o_m, o_m < M, M)
            dalpha_t = tl.load(dalpha + tok[:, None] * M + o_m[None, :], mask=m_tm, other=0.0)
            grad = alpha * (dalpha_t - total[:, None])
            top = is_top_row(alpha)
            others += tl.sum(tl.where(top, 0.0, grad), 1)
            top_row = tl.maximum(top_row, tl.max(tl.where(top, o_m[None, :], -1), 1))
            tl.store(dlogits + tok[:, None] * M + o_m[None, :], grad.to(dlogits.dtype.element_ty), mask=m_tm & ~top)
        tl.store(dlogits + tok * M + top_row, (-others).to(dlogits.dtype.element_ty), mask=m_t & (top_row >= 0))
