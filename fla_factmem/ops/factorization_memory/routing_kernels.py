"""Triton routing of the sparse variant: each token's top K of its M logits, and the weights
theta = eta * alpha, phi = mu * alpha of its picks (alpha the softmax re-normalised over them)."""

import triton
import triton.language as tl

# the lowest finite float32: a logit of -inf still ranks above the lanes past M and the rows
# already taken, so the top K are always K distinct real rows
LOWEST_LOGIT = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def top_k(x, o_m, m_m, K: tl.constexpr, KB: tl.constexpr):
    """The K largest logits of each row of x [BR, BM] (lanes where m_m [BM] is False do not
    count): their rows and values, [BR, KB] each, largest first; lanes k >= K get row 0 and
    value -inf. Ties go to the lower row. K max-reductions over BM lanes: meant for K up to
    about 64."""
    x = tl.where(m_m[None, :], tl.maximum(x, LOWEST_LOGIT), float("-inf"))
    o_k = tl.arange(0, KB)[None, :]
    rows = tl.zeros([x.shape[0], KB], dtype=tl.int32)
    values = tl.full([x.shape[0], KB], float("-inf"), dtype=tl.float32)
    for k in range(K):
        top, row = tl.max(x, 1, return_indices=True, return_indices_tie_break_left=True)
        rows = tl.where(o_k == k, row[:, None], rows)
        values = tl.where(o_k == k, top[:, None], values)
        x = tl.where(o_m[None, :] == row[:, None], float("-inf"), x)
    return rows, values


@triton.jit
def sparse_routing_kernel(
    logits,
    eta,
    mu,
    picks,
    theta,
    phi,
    n_rows,
    M: tl.constexpr,
    K: tl.constexpr,
    BR: tl.constexpr,
    BM: tl.constexpr,
    KB: tl.constexpr,
):
    """For BR rows of the flat [n_rows, M] logits (and [n_rows] eta, mu): picks [n_rows, K]
    int32, the top-K rows largest first, and their theta and phi [n_rows, K] float32."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_m = tl.arange(0, BM)
    o_k = tl.arange(0, KB)
    m_r, m_m = o_r < n_rows, o_m < M
    x = tl.load(logits + o_r[:, None].to(tl.int64) * M + o_m[None, :], mask=m_r[:, None] & m_m[None, :], other=0.0)
    rows, top = top_k(x.to(tl.float32), o_m, m_m, K, KB)
    alpha = tl.exp(top - tl.max(top, 1)[:, None])
    alpha = alpha / tl.sum(alpha, 1)[:, None]
    eta_r = tl.load(eta + o_r, mask=m_r, other=0.0).to(tl.float32)
    mu_r = tl.load(mu + o_r, mask=m_r, other=0.0).to(tl.float32)
    out = o_r[:, None].to(tl.int64) * K + o_k[None, :]
    m_out = m_r[:, None] & (o_k < K)[None, :]
    tl.store(picks + out, rows, mask=m_out)
    tl.store(theta + out, eta_r[:, None] * alpha, mask=m_out)
    tl.store(phi + out, mu_r[:, None] * alpha, mask=m_out)
