"""Triton forward kernels of dense Factorization Memory, chunk-parallel.

A sequence is cut into chunks of BT = 64 tokens and each chunk into sub-chunks of BS = 16.
From the logits and the per-token log-sum-exp (one float per token, from
``logsumexp_kernel``) every kernel derives alpha, theta = eta * alpha, phi = mu * alpha and
the log-decay g = log(1 - theta) on chip; none of them is ever written to memory.

1. ``chunk_state_increment_kernel``, parallel over chunks: what each chunk adds to the
   memory, sum_s theta_s exp(G_last - G_s) v_s, and its decay exp(G_last), with G the
   cumulative log-decay inside the chunk.
2. ``chunk_state_scan_kernel``, parallel over sequences, heads and blocks of the state: an
   element-wise scan over chunks that turns the increments into the memory at the start of
   every chunk (and the final state).
3. ``chunk_fwd_o_kernel``, parallel over chunks: from the memory at the chunk's start it
   walks the chunk's sub-chunks, per sub-chunk

       o_t = sum_j phi_t[j] exp(b_t[j]) h[j] + sum_{s <= t} A[t, s] v_s
       A[t, s] = sum_j phi_t[j] theta_s[j] exp(b_t[j] - b_s[j])

   with b the cumulative log-decay inside the sub-chunk.

Every exponent is a sum of log-decays over the span it covers, hence <= 0 (SPEC section 3);
pairwise decays inside a sub-chunk are taken element by element rather than factored
through a reference point, which keeps theta = 1 exact. The backward pass runs the same
increment and scan kernels in reverse (``GRAD``/``REVERSE`` switches) and its own
sub-chunk kernel (``chunk_bwd_kernels.py``).
"""

import triton
import triton.language as tl

# the optional arguments every kernel of this op takes, as compile-time switches
STATE_AND_VARLEN_SWITCHES = {
    "USE_INITIAL_STATE": lambda args: args["h0"] is not None,
    "STORE_FINAL_STATE": lambda args: args["ht"] is not None,
    "IS_VARLEN": lambda args: args["cu_seqlens"] is not None,
}
VARLEN_SWITCH = {"IS_VARLEN": STATE_AND_VARLEN_SWITCHES["IS_VARLEN"]}

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
def chunk_coordinates(i_tc, chunk_indices, cu_seqlens, T, NT, IS_VARLEN: tl.constexpr):
    """Sequence, chunk within it, and the sequence's bounds of global chunk i_tc. Chunks are
    numbered sequence after sequence, which is also their slot in the state buffers."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_tc * 2).to(tl.int32)
        i_c = tl.load(chunk_indices + i_tc * 2 + 1).to(tl.int32)
    else:
        i_n = i_tc // NT
        i_c = i_tc % NT
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    return i_n, i_c, bos, eos


@triton.jit
def routing_gates(logits, lse, eta, mu, tok, m_t, o_m, m_m, M: tl.constexpr):
    """alpha, theta, phi and g = log(1 - theta) as [len(tok), BM] float32 tiles, and eta, mu
    of the tokens; tok holds flat (token, head) indices. Masked tokens and rows get
    alpha = 0, hence theta = phi = g = 0: they leave the memory as it is."""
    x = tl.load(logits + tok[:, None] * M + o_m[None, :], mask=m_t[:, None] & m_m[None, :], other=float("-inf"))
    lse_t = tl.load(lse + tok, mask=m_t, other=0.0)
    eta_t = tl.load(eta + tok, mask=m_t, other=0.0).to(tl.float32)
    mu_t = tl.load(mu + tok, mask=m_t, other=0.0).to(tl.float32)
    alpha = tl.exp(x.to(tl.float32) - lse_t[:, None])
    theta = eta_t[:, None] * alpha
    phi = mu_t[:, None] * alpha
    g = tl.log(1.0 - theta + DECAY_FLOOR)
    return alpha, theta, phi, g, eta_t, mu_t


@triton.jit
def advance_state(h, x, theta, g, TRANSPOSED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The memory after a block of tokens: exp(G_last) h + sum_s theta_s exp(G_last - G_s) x_s.
    h is [BM, BV] (or [BV, BM] when TRANSPOSED), x [BS, BV], theta and g [BS, BM]."""
    G = tl.cumsum(g, 0)
    G_last = tl.sum(g, 0)
    # clamped: the sum and the cumulative sum may round apart by an ulp
    w = theta * tl.exp(tl.minimum(G_last[None, :] - G, 0.0))
    if TRANSPOSED:
        return tl.dot(tl.trans(x), w, h * tl.exp(G_last)[None, :], input_precision=DOT_PRECISION)
    else:
        return tl.dot(tl.trans(w), x, h * tl.exp(G_last)[:, None], input_precision=DOT_PRECISION)


@triton.jit
def carry_gradient_back(dh, do, phi, g, TRANSPOSED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The gradient on the memory before a block of tokens, from dh on the memory after it:
    exp(G_last) dh + sum_u phi_u exp(G_u) do_u. Shapes as in ``advance_state``."""
    G = tl.cumsum(g, 0)
    w = phi * tl.exp(G)
    decay = tl.exp(tl.sum(g, 0))
    if TRANSPOSED:
        return tl.dot(tl.trans(do), w, dh * decay[None, :], input_precision=DOT_PRECISION)
    else:
        return tl.dot(tl.trans(w), do, dh * decay[:, None], input_precision=DOT_PRECISION)


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


@triton.heuristics(VARLEN_SWITCH)
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_state_increment_kernel(
    x,
    logits,
    lse,
    eta,
    mu,
    increments,
    decays,
    chunk_indices,
    cu_seqlens,
    T,
    NT,
    H: tl.constexpr,
    M: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """increments: [NT_total, H, M, V] float32, decays: [NT_total, H, M] float32.
    Forward (x = v): the memory a chunk adds, sum_s theta_s exp(G_last - G_s) v_s.
    GRAD (x = do): the gradient a chunk adds on the memory before it, sum_u phi_u exp(G_u) do_u.
    Both store the chunk's decay exp(G_last)."""
    i_mv, i_tc, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_m, i_v = i_mv // tl.cdiv(V, BV), i_mv % tl.cdiv(V, BV)
    i_n, i_c, bos, eos = chunk_coordinates(i_tc, chunk_indices, cu_seqlens, T, NT, IS_VARLEN)
    rows = i_c * BT + tl.arange(0, BT)
    m_t = rows < eos - bos
    tok = (bos + rows) * H + i_h
    o_m = i_m * BM + tl.arange(0, BM)
    o_v = i_v * BV + tl.arange(0, BV)
    m_m, m_v = o_m < M, o_v < V

    _, theta, phi, g, _, _ = routing_gates(logits, lse, eta, mu, tok, m_t, o_m, m_m, M)
    x_t = tl.load(x + tok[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    zero = tl.zeros([BM, BV], dtype=tl.float32)
    if GRAD:
        inc = carry_gradient_back(zero, x_t, phi, g, False, DOT_PRECISION)
    else:
        inc = advance_state(zero, x_t, theta, g, False, DOT_PRECISION)
    row = (i_tc.to(tl.int64) * H + i_h) * M + o_m
    tl.store(increments + row[:, None] * V + o_v[None, :], inc, mask=m_m[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(decays + row, tl.exp(tl.sum(g, 0)), mask=m_m)


@triton.heuristics(STATE_AND_VARLEN_SWITCHES)
@triton.jit(do_not_specialize=["NT"])
def chunk_state_scan_kernel(
    states,
    decays,
    h0,
    ht,
    chunk_offsets,
    cu_seqlens,
    NT,
    H: tl.constexpr,
    M: tl.constexpr,
    V: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    REVERSE: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """Turns per-chunk increments into per-chunk states, in place in ``states``
    [NT_total, H, M, V], element by element: s <- decay * s + increment.
    Forward: h0 is the initial state, slot c ends up with the memory at the start of chunk c,
    ht gets the final state. REVERSE: h0 is the gradient on the final state, slot c ends up
    with the gradient on the memory at the end of chunk c from everything after it, ht gets
    the gradient on the initial state."""
    i_mv, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_m, i_v = i_mv // tl.cdiv(V, BV), i_mv % tl.cdiv(V, BV)
    if IS_VARLEN:
        first = tl.load(chunk_offsets + i_n).to(tl.int64)
        count = tl.load(chunk_offsets + i_n + 1).to(tl.int64) - first
    else:
        first = i_n.to(tl.int64) * NT
        count = first * 0 + NT  # a tensor, like the varlen count
    o_m = i_m * BM + tl.arange(0, BM)
    o_v = i_v * BV + tl.arange(0, BV)
    m_m, m_v = o_m < M, o_v < V
    m_state = m_m[:, None] & m_v[None, :]
    state_offsets = ((i_n.to(tl.int64) * H + i_h) * M + o_m[:, None]) * V + o_v[None, :]

    s = tl.zeros([BM, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        s += tl.load(h0 + state_offsets, mask=m_state, other=0.0).to(tl.float32)
    # the walk is latency-bound: the next chunk's increment is loaded before this one is used
    step = -1 if REVERSE else 1
    c = first + (count - 1) * (step < 0)
    row = (c * H + i_h) * M + o_m
    m_any = m_m & (o_m * 0 < count)  # no chunk at all: an empty sequence
    inc = tl.load(states + row[:, None] * V + o_v[None, :], mask=m_any[:, None] & m_v[None, :], other=0.0)
    decay = tl.load(decays + row, mask=m_any, other=0.0)
    for i in range(count):
        c_next = c + step
        row_next = (c_next * H + i_h) * M + o_m
        m_next = m_m & (o_m * 0 + i + 1 < count)
        inc_next = tl.load(
            states + row_next[:, None] * V + o_v[None, :], mask=m_next[:, None] & m_v[None, :], other=0.0
        )
        decay_next = tl.load(decays + row_next, mask=m_next, other=0.0)
        tl.store(states + row[:, None] * V + o_v[None, :], s, mask=m_state)
        s = s * decay[:, None] + inc
        c, row, inc, decay = c_next, row_next, inc_next, decay_next
    if STORE_FINAL_STATE:
        tl.store(ht + state_offsets, s, mask=m_state)


@triton.heuristics(VARLEN_SWITCH)
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_fwd_o_kernel(
    v,
    logits,
    lse,
    eta,
    mu,
    states,
    o,
    chunk_indices,
    cu_seqlens,
    T,
    NT,
    stride_o_block,
    H: tl.constexpr,
    M: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BS: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """states: [NT_total, H, M, V] memory at each chunk's start. One program per (chunk, head,
    block of rows, block of value columns) walks the chunk's sub-chunks with its block of the
    memory in registers. o: the output [B, T, H, V] in v's dtype when one block covers all M
    rows, else [NM, B, T, H, V] float32 partial outputs, one slice per block of rows."""
    i_tc, i_h, i_mv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_m, i_v = i_mv // tl.cdiv(V, BV), i_mv % tl.cdiv(V, BV)
    i_n, i_c, bos, eos = chunk_coordinates(i_tc, chunk_indices, cu_seqlens, T, NT, IS_VARLEN)
    length = eos - bos
    o_s = tl.arange(0, BS)
    o_m = i_m * BM + tl.arange(0, BM)
    o_v = i_v * BV + tl.arange(0, BV)
    m_m, m_v = o_m < M, o_v < V
    causal = (o_s[:, None] >= o_s[None, :])[:, :, None]
    row = (i_tc.to(tl.int64) * H + i_h) * M + o_m
    h = tl.load(states + row[:, None] * V + o_v[None, :], mask=m_m[:, None] & m_v[None, :], other=0.0)
    o += i_m.to(tl.int64) * stride_o_block

    for i_s in range(0, tl.cdiv(tl.minimum(length - i_c * BT, BT), BS)):
        rows = i_c * BT + i_s * BS + o_s
        m_t = rows < length
        tok = (bos + rows) * H + i_h
        m_tv = m_t[:, None] & m_v[None, :]
        _, theta, phi, g, _, _ = routing_gates(logits, lse, eta, mu, tok, m_t, o_m, m_m, M)
        v_t = tl.load(v + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b = tl.cumsum(g, 0)
        span = tl.where(causal, b[:, None, :] - b[None, :, :], float("-inf"))
        scores = tl.sum(phi[:, None, :] * theta[None, :, :] * tl.exp(span), 2)
        out = tl.dot(phi * tl.exp(b), h, input_precision=DOT_PRECISION)
        out = tl.dot(scores, v_t, out, input_precision=DOT_PRECISION)
        tl.store(o + tok[:, None] * V + o_v[None, :], out.to(o.dtype.element_ty), mask=m_tv)
        h = advance_state(h, v_t, theta, g, False, DOT_PRECISION)
