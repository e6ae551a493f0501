"""Triton routing of the sparse variant: each token's top K of its M logits and their alpha,
the softmax re-normalised over them (theta = eta * alpha and phi = mu * alpha are formed where
the picks are sorted into events, ``chunk_sparse_kernels.sparse_events_kernel``)."""

import triton
import triton.language as tl

# the lowest finite float32: a logit of -inf still ranks above the lanes past M and the rows
# already taken, so the top K are always K distinct real rows
LOWEST_LOGIT = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def ranked(x, valid):
    """x where ``valid`` with -inf raised to LOWEST_LOGIT, -inf elsewhere: every valid entry
    outranks every invalid one."""
    return tl.where(valid, tl.maximum(x, LOWEST_LOGIT), float("-inf"))


@triton.jit
def picks_softmax(values):
    """alpha over the picks of each row of values [BR, KB] (-inf past K): the softmax
    re-normalised over them, the same arithmetic in training's routing and in decoding."""
    alpha = tl.exp(values - tl.max(values, 1)[:, None])
    return alpha / tl.sum(alpha, 1)[:, None]


@triton.jit
def top_k(x, rows, valid, K: tl.constexpr, KB: tl.constexpr):
    """The K largest entries of each x[r] (x [BR, A, C]; ``rows``, the distinct int32 row of each
    entry, and ``valid``, where entries count, broadcast to x): their rows and values, [BR, KB]
    each, largest first; lanes k >= K get row 0 and value -inf. Ties go to the lower row.
    x is 3-D so that the grouped search of ``top_k_logits`` needs no reshape (Triton 3.6
    fails to compile a reduction of a reshaped tile on Hopper)."""
    x = ranked(x, valid)
    o_k = tl.arange(0, KB)[None, :]
    picks = tl.zeros([x.shape[0], KB], dtype=tl.int32)
    values = tl.full([x.shape[0], KB], float("-inf"), dtype=tl.float32)
    for k in range(K):
        top = tl.max(tl.max(x, 2), 1)
        row = tl.min(tl.min(tl.where(x == top[:, None, None], rows, 2**31 - 1), 2), 1)
        picks = tl.where(o_k == k, row[:, None], picks)
        values = tl.where(o_k == k, top[:, None], values)
        x = tl.where(rows == row[:, None, None], float("-inf"), x)
    return picks, values


@triton.jit
def top_k_logits(
    logits, start, m_r, M: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, KB: tl.constexpr, G: tl.constexpr
):
    """The top K of the M logits at ``logits + start[r]`` for each row r (start [BR] int64, m_r
    [BR] which rows exist): their rows and values as in ``top_k``, ties to the lower row.

    In groups of G logits (G > 1 needs BM // G >= 2 KB, so that more than K groups hold logits):
    the top K lie in the K groups of the largest maxima (a logit outside them is outranked by
    those K maxima), so K searches over the BM // G group maxima and K over the K * G logits of
    the chosen groups replace K searches over all BM logits."""
    NG: tl.constexpr = BM // G
    o_g, o_i = tl.arange(0, NG), tl.arange(0, G)
    in_row = (o_g[:, None] * G + o_i[None, :])[None, :, :]  # [1, NG, G]
    m_in = m_r[:, None, None] & (in_row < M)
    x = tl.load(logits + start[:, None, None] + in_row, mask=m_in, other=0.0).to(tl.float32)
    if G == 1:
        return top_k(x, in_row, m_in, K, KB)
    x = ranked(x, m_in)
    groups, _ = top_k(tl.max(x, 2)[:, :, None], o_g[None, :, None], (o_g * G < M)[None, :, None], K, KB)
    rows = groups[:, :, None] * G + o_i[None, None, :]  # [BR, KB, G]
    m_c = (tl.arange(0, KB) < K)[None, :, None] & (rows < M) & m_r[:, None, None]
    candidates = tl.load(logits + start[:, None, None] + rows, mask=m_c, other=0.0).to(tl.float32)
    return top_k(candidates, rows, m_c, K, KB)


@triton.jit
def sparse_routing_kernel(
    logits,
    picks,
    alpha,
    n_rows,
    M: tl.constexpr,
    K: tl.constexpr,
    BR: tl.constexpr,
    BM: tl.constexpr,
    KB: tl.constexpr,
    G: tl.constexpr,
):
    """For BR rows of the flat [n_rows, M] logits: picks [n_rows, K] int32, the top-K rows
    largest first, and their alpha [n_rows, K] float32, the softmax re-normalised over them;
    G as in ``top_k_logits``."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_k = tl.arange(0, KB)
    m_r = o_r < n_rows
    rows, top = top_k_logits(logits, o_r.to(tl.int64) * M, m_r, M, K, BM, KB, G)
    out = o_r[:, None].to(tl.int64) * K + o_k[None, :]
    m_out = m_r[:, None] & (o_k < K)[None, :]
    tl.store(picks + out, rows, mask=m_out)
    tl.store(alpha + out, picks_softmax(top), mask=m_out)


@triton.jit
def sparse_routing_bwd_kernel(
    alpha,
    eta,
    mu,
    picks,
    pick_dtheta,
    pick_dphi,
    dlogits,
    deta,
    dmu,
    n_rows,
    M: tl.constexpr,
    K: tl.constexpr,
    BR: tl.constexpr,
    KB: tl.constexpr,
    BM: tl.constexpr,
):
    """For BR rows of the flat [n_rows, M] logits: from the gradients on the picks' theta and
    phi (pick_dtheta, pick_dphi [n_rows, K] float32), the gradients through theta = eta * alpha,
    phi = mu * alpha and the softmax re-normalised over the picks (alpha [n_rows, K] float32, as
    the routing left it): dlogits [n_rows, M], whole rows, 0 outside the picks (rows nobody
    picks get no gradient), written BM at a time; deta, dmu [n_rows]."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_k = tl.arange(0, KB)
    m_r = o_r < n_rows
    m_rk = m_r[:, None] & (o_k < K)[None, :]
    pick = o_r[:, None].to(tl.int64) * K + o_k[None, :]
    rows = tl.load(picks + pick, mask=m_rk, other=0)
    alpha_k = tl.load(alpha + pick, mask=m_rk, other=0.0)
    dtheta = tl.load(pick_dtheta + pick, mask=m_rk, other=0.0)
    dphi = tl.load(pick_dphi + pick, mask=m_rk, other=0.0)
    eta_r = tl.load(eta + o_r, mask=m_r, other=0.0).to(tl.float32)
    mu_r = tl.load(mu + o_r, mask=m_r, other=0.0).to(tl.float32)
    dalpha = mu_r[:, None] * dphi + eta_r[:, None] * dtheta
    # sum_k alpha dalpha from the very values used: with one pick (alpha = 1) the gradient is exactly 0
    grad = alpha_k * (dalpha - tl.sum(alpha_k * dalpha, 1)[:, None])
    # zeros over whole rows, then the picks over them: one pass over dlogits, no zeroed tensor
    # made beforehand; the barrier orders the two stores, which other threads may make
    o_m = tl.arange(0, BM)
    row_start = o_r.to(tl.int64)[:, None] * M
    for m0 in range(0, M, BM):
        m_rm = m_r[:, None] & (m0 + o_m < M)[None, :]
        tl.store(dlogits + row_start + m0 + o_m[None, :], tl.zeros([BR, BM], dlogits.dtype.element_ty), mask=m_rm)
    tl.debug_barrier()
    tl.store(dlogits + row_start + rows, grad.to(dlogits.dtype.element_ty), mask=m_rk)
    tl.store(deta + o_r, tl.sum(alpha_k * dtheta, 1).to(deta.dtype.element_ty), mask=m_r)
    tl.store(dmu + o_r, tl.sum(alpha_k * dphi, 1).to(dmu.dtype.element_ty), mask=m_r)
