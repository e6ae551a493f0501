"""Triton forward kernels of dense Factorization Memory.

One program owns one (sequence, head, block of memory rows, block of value columns) and
walks the sequence in sub-chunks of BT tokens, holding its block of the memory in
registers: nothing but the inputs, the output and the final state touches global memory.
Rows of the memory decay independently (the decay is diagonal), so blocks of rows never
talk to each other; only the output sums over them.

Per sub-chunk, from the logits and the per-token log-sum-exp (one float per token, from
``logsumexp_kernel``) the program derives alpha, theta = eta * alpha, phi = mu * alpha and
the log-decay g = log(1 - theta) on chip, then, with b the cumulative sum of g inside the
sub-chunk:

    o_t   = sum_j phi_t[j] exp(b_t[j]) h[j] + sum_{s <= t} A[t, s] v_s
    A[t,s]= sum_j phi_t[j] theta_s[j] exp(b_t[j] - b_s[j])
    h    <- exp(b_last) h + sum_s theta_s exp(b_last - b_s) v_s

Every exponent is a sum of log-decays over the span it covers, hence <= 0 (SPEC
section 3); the pairwise decays inside a sub-chunk are taken element by element rather than
factored through a reference point, which is what keeps theta = 1 exact.
"""

import triton
import triton.language as tl

# the optional arguments every kernel of this op takes, as compile-time switches
STATE_AND_VARLEN_SWITCHES = {
    "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
    "STORE_FINAL_STATE": lambda args: args["ht"] is not None,
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
}

# log(1 - theta + DECAY_FLOOR) keeps theta = 1 finite; the same floor as the PyTorch path.
DECAY_FLOOR = tl.constexpr(1e-30)


@triton.jit
def sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """First and one-past-last flat token index of sequence i_n: packed, or row i_n of [B, T]."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def logsumexp_kernel(logits, lse, n_rows, M: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr):
    """lse[r] = log sum_j exp(logits[r, j]) for rows of a contiguous [n_rows, M] tensor."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BM)
    mask = (rows < n_rows)[:, None] & (cols < M)[None, :]
    x = tl.load(logits + rows[:, None].to(tl.int64) * M + cols[None, :], mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    top = tl.max(x, 1)
    top = tl.where(rows < n_rows, top, 0.0)
    total = tl.sum(tl.exp(x - top[:, None]), 1)
    total = tl.where(rows < n_rows, total, 1.0)
    tl.store(lse + rows, top + tl.log(total), mask=rows < n_rows)


@triton.heuristics(STATE_AND_VARLEN_SWITCHES)
@triton.jit(do_not_specialize=["T"])
def chunk_fwd_kernel(
    v,
    logits,
    lse,
    eta,
    mu,
    h0,
    o,
    ht,
    cu_seqlens,
    T,
    stride_o_block,
    H: tl.constexpr,
    M: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """o: [NM, B*T, H, V] float32 partial outputs (one slice per block of rows), or the
    output itself in v's dtype when one block covers all M rows."""
    i_v, i_m, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    length = eos - bos

    o_m = i_m * BM + tl.arange(0, BM)
    o_v = i_v * BV + tl.arange(0, BV)
    m_m, m_v = o_m < M, o_v < V
    o_t = tl.arange(0, BT)
    causal = o_t[:, None] >= o_t[None, :]
    state_offsets = (i_nh.to(tl.int64) * M + o_m[:, None]) * V + o_v[None, :]
    m_state = m_m[:, None] & m_v[None, :]

    h = tl.zeros([BM, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        h += tl.load(h0 + state_offsets, mask=m_state, other=0.0).to(tl.float32)
    o += i_m.to(tl.int64) * stride_o_block

    for i_t in range(0, tl.cdiv(length, BT)):
        rows = i_t * BT + o_t
        m_t = rows < length
        tok = (bos + rows) * H + i_h  # flat (token, head) index
        x = tl.load(logits + tok[:, None] * M + o_m[None, :], mask=m_t[:, None] & m_m[None, :], other=float("-inf"))
        lse_t = tl.load(lse + tok, mask=m_t, other=0.0)
        eta_t = tl.load(eta + tok, mask=m_t, other=0.0).to(tl.float32)
        mu_t = tl.load(mu + tok, mask=m_t, other=0.0).to(tl.float32)
        v_t = tl.load(v + tok[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        v_t = v_t.to(tl.float32)

        alpha = tl.exp(x.to(tl.float32) - lse_t[:, None])
        theta = eta_t[:, None] * alpha
        phi = mu_t[:, None] * alpha
        g = tl.log(1.0 - theta + DECAY_FLOOR)
        b = tl.cumsum(g, 0)
        b_last = tl.sum(g, 0)

        # pairwise decays inside the sub-chunk, element by element: [BT (t), BT (s), BM]
        span = tl.where(causal[:, :, None], b[:, None, :] - b[None, :, :], float("-inf"))
        scores = tl.sum(phi[:, None, :] * theta[None, :, :] * tl.exp(span), 2)

        o_blk = tl.dot(phi * tl.exp(b), h, input_precision=DOT_PRECISION)
        o_blk = tl.dot(scores, v_t, o_blk, input_precision=DOT_PRECISION)
        tl.store(o + tok[:, None] * V + o_v[None, :], o_blk.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])

        k_t = theta * tl.exp(tl.minimum(b_last[None, :] - b, 0.0))
        h = h * tl.exp(b_last)[:, None]
        h = tl.dot(tl.trans(k_t), v_t, h, input_precision=DOT_PRECISION)

    if STORE_FINAL_STATE:
        tl.store(ht + state_offsets, h, mask=m_state)
