"""Triton forward kernels of dense Factorization Memory, chunk-parallel.

A sequence is cut into chunks of BT tokens (``launch.CHUNK``). From the logits and the per-token
log-sum-exp (two floats per token, from ``logsumexp_kernel``) every kernel derives alpha,
theta = eta * alpha, phi = mu * alpha and the decay d = 1 - theta on chip; none of them is ever
written to memory.

1. ``chunk_state_increment_kernel``, parallel over chunks: what each chunk adds to the
   memory, sum_s theta_s d_{s+1} ... d_last v_s, and its decay d_1 ... d_last.
2. ``chunk_state_scan_kernel``, parallel over sequences, heads and blocks of the state: an
   element-wise scan over chunks that turns the increments into the memory at the start of
   every chunk (and the final state). With enough sequences and heads to fill the GPU,
   ``chunk_state_walk_kernel`` does 1 and 2 in one pass instead.
3. ``chunk_fwd_o_kernel``, parallel over chunks: o = (phi * P) h + A v, with h the memory at
   the chunk's start, P_t = d_1 ... d_t and the intra-chunk scores
   A[t, s] = sum_j phi_t[j] theta_s[j] d_{s+1}[j] ... d_t[j] for s <= t.

Decays are running products of factors in [0, 1], never exp of a sum of logs: no exponent at
all, so none is positive (SPEC section 3), theta = 1 is an exact 0 that cuts the spans holding
it and leaves every other span untouched, and no product is ever divided by a factor (which may
be 0): products "after s" start from the next token's d, loaded shifted, or (the levels below)
gathered from the chunk's own d.

The scores are matrix products. Every pair s < t of a chunk belongs to exactly one level l: the
aligned block of 2L tokens (L = 2^l) that holds both, with s in its first half and t in its
second. Split at the end r of the first half,

    d_{s+1} ... d_t = (d_{r+1} ... d_t) * (d_{s+1} ... d_r),

two factors, each a product over one half-block. Level l's pairs are then one product
(phi * qx_l) (theta * kx_l)^T, masked to its pairs. The factors of all levels are the steps of
one Sklansky scan along the tokens (``next_level_factors``), whose last step gives the chunk's
d_1 ... d_t: one gather a level, where a scan restricted to each level's blocks costs a shuffle
a token at every stage of every level (benchmarks/ops/NOTES.md, session 43). The backward pass
(``chunk_bwd_kernels.py``) uses the same levels.
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


@triton.jit
def multiply(a, b):
    """The combine function of ``product``."""
    return a * b


@triton.jit
def product(x, axis: tl.constexpr):
    """The product of ``x`` along ``axis`` (Triton has tl.cumprod, but no reduction by product)."""
    return tl.reduce(x, axis, multiply)


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
def sequence_chunks(chunk_offsets, i_n, NT, IS_VARLEN: tl.constexpr):
    """The first global chunk of sequence i_n and its number of chunks (both int64 tensors)."""
    if IS_VARLEN:
        first = tl.load(chunk_offsets + i_n).to(tl.int64)
        count = tl.load(chunk_offsets + i_n + 1).to(tl.int64) - first
    else:
        first = i_n.to(tl.int64) * NT
        count = first * 0 + NT  # a tensor, like the varlen count
    return first, count


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
def chunk_positions(BT: tl.constexpr, LAST_FIRST: tl.constexpr):
    """The positions 0 ... BT-1 of a chunk's tokens, or BT-1 ... 0 with LAST_FIRST. The chunk
    increments' forward (``chunk_increment``: the increments kernel and the state walk) and the dv
    kernel need products over the tokens after each one: they take their tokens last first and
    scan forward, as Triton 3.6 compiles tl.cumprod(..., reverse=True) over a chunk with about
    five times the shuffles of a forward scan (benchmarks/ops/NOTES.md, session 43)."""
    o_t = tl.arange(0, BT)
    if LAST_FIRST:
        o_t = BT - 1 - o_t
    return o_t


@triton.jit
def chunk_tokens(
    chunk_indices,
    cu_seqlens,
    i_tc,
    i_h,
    T,
    NT,
    H: tl.constexpr,
    BT: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    LAST_FIRST: tl.constexpr = False,
):
    """Global chunk i_tc's flat (token, head) indices, which of them exist, and which have a next
    token in the chunk; LAST_FIRST lists them from the chunk's last token (``chunk_positions``)."""
    i_n, i_c, bos, eos = chunk_coordinates(i_tc, chunk_indices, cu_seqlens, T, NT, IS_VARLEN)
    return tokens_of_chunk(i_c, bos, eos, i_h, H, BT, LAST_FIRST)


@triton.jit
def tokens_of_chunk(i_c, bos, eos, i_h, H: tl.constexpr, BT: tl.constexpr, LAST_FIRST: tl.constexpr):
    """``chunk_tokens`` for chunk i_c of the sequence of flat tokens [bos, eos)."""
    o_t = chunk_positions(BT, LAST_FIRST)
    rows = i_c * BT + o_t
    m_t = rows < eos - bos
    m_next = (o_t < BT - 1) & (rows + 1 < eos - bos)
    return (bos + rows) * H + i_h, m_t, m_next


@triton.jit
def routing_weight(x, top, log_total):
    """alpha = softmax weight of logits x, float32, from the log-sum-exp's two parts (broadcast to
    x's shape by the caller): the exponent is never positive."""
    return tl.exp((x.to(tl.float32) - top) - log_total)


@triton.jit
def routing_alpha(logits, lse, tok, m_t, o_m, m_m, M: tl.constexpr):
    """alpha as a [len(tok), BM] float32 tile over memory rows o_m; tok holds flat (token, head)
    indices. Masked tokens and rows get alpha = 0."""
    x = tl.load(logits + tok[:, None] * M + o_m[None, :], mask=m_t[:, None] & m_m[None, :], other=float("-inf"))
    top = tl.load(lse + 2 * tok, mask=m_t, other=0.0)
    log_total = tl.load(lse + 2 * tok + 1, mask=m_t, other=0.0)
    return routing_weight(x, top[:, None], log_total[:, None])


@triton.jit
def formed_once(x):
    """x itself, through an identity gather along its first axis. Triton 3.6 forms a value afresh
    in every layout its consumers take it in rather than convert it; it never forms a gather's
    result twice, so what comes out of this is formed once, in the layout Triton picks for the
    gather (with the levels' scan, ``next_level_factors``: the scan's own)."""
    return tl.gather(x, tl.broadcast_to(tl.arange(0, x.shape[0])[:, None], x.shape), 0)


@triton.jit
def routing_gates(logits, lse, eta, mu, tok, m_t, o_m, m_m, M: tl.constexpr, FORMED_ONCE: tl.constexpr = False):
    """alpha, theta, phi and the decay d = 1 - theta as [len(tok), BM] float32 tiles, and eta, mu
    of the tokens; tok holds flat (token, head) indices. Masked tokens and rows get
    alpha = 0, hence theta = phi = 0 and d = 1: they leave the memory as it is. FORMED_ONCE
    passes alpha through ``formed_once``: kernels with the levels' scan formed it from the
    logits in four layouts otherwise, an exp an element each (benchmarks/ops/NOTES.md,
    session 43)."""
    alpha = routing_alpha(logits, lse, tok, m_t, o_m, m_m, M)
    if FORMED_ONCE:
        alpha = formed_once(alpha)
    eta_t = tl.load(eta + tok, mask=m_t, other=0.0).to(tl.float32)
    mu_t = tl.load(mu + tok, mask=m_t, other=0.0).to(tl.float32)
    theta = eta_t[:, None] * alpha
    phi = mu_t[:, None] * alpha
    return alpha, theta, phi, 1.0 - theta, eta_t, mu_t


@triton.jit
def chunk_gates(logits, lse, eta, mu, tok, m_t, o_m, m_m, M: tl.constexpr, FORMED_ONCE: tl.constexpr = False):
    """theta, phi and d = 1 - theta as [len(tok), BM] float32 tiles over memory rows o_m, from the
    logits and the log-sum-exp (FORMED_ONCE as in ``routing_gates``)."""
    _, theta, phi, d, _, _ = routing_gates(logits, lse, eta, mu, tok, m_t, o_m, m_m, M, FORMED_ONCE)
    return theta, phi, d


@triton.jit
def next_level_factors(qx, kx, d, L: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr):
    """One step of a Sklansky scan along the chunk's tokens. In: for aligned blocks of L tokens,
    qx[t] = product of d from t's block start through t and kx[s] = product of d after s through
    its block's end, both [BT, BM] in [0, 1]. Out: the same for blocks of 2L. A token in the
    second half of its 2L block takes in the first half's product (qx at its last token), one in
    the first half the second half's (d * kx at its first token): one gather for both, and no
    division, so an exact 0 of d stays where it is."""
    o_t = tl.arange(0, BT)
    second = (o_t // L) % 2 == 1
    middle = o_t // (2 * L) * (2 * L) + L  # the first token of the 2L block's second half
    partner = tl.where(second, middle - 1, middle)
    halves = tl.gather(tl.where(second[:, None], d * kx, qx), tl.broadcast_to(partner[:, None], [BT, BM]), 0)
    return tl.where(second[:, None], qx * halves, qx), tl.where(second[:, None], kx, kx * halves)


@triton.jit
def level_pairs(t, s, L: tl.constexpr):
    """Whether (t, s) is a pair of level L: same aligned block of 2L tokens, s in its first half,
    t in its second. t and s are broadcastable index tensors."""
    return (t // (2 * L) == s // (2 * L)) & ((t // L) % 2 == 1) & ((s // L) % 2 == 0)


@triton.jit
def level_product(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b for one level's pairs. With half inputs (DOT_PRECISION "tf32") the operands go to the
    tensor cores as bf16: they are gates times decays in [0, 1] or <do, v> sums, and bf16 keeps
    float32's range, which fp16 would not. For bf16 inputs its rounding sits at the inputs' own
    precision, as in FLA's kernels; fp16 inputs get the same bf16 products, coarser than their
    own precision (within the tests' 1e-2). About 8% of the dense forward+backward at M=256 in
    bf16 (benchmarks/ops/NOTES.md, session 33)."""
    if DOT_PRECISION != "ieee":
        a, b = a.to(tl.bfloat16), b.to(tl.bfloat16)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def intra_chunk_scores(
    scores, theta, phi, d, BT: tl.constexpr, BM: tl.constexpr, LEVELS: tl.constexpr, DOT_PRECISION: tl.constexpr
):
    """scores plus one block of rows' part of A[t, s] = sum_j phi_t[j] theta_s[j] d_{s+1}[j] ... d_t[j]
    for s < t, over all levels: [BT, BT]; and the chunk's decays d_1 ... d_t through every token t,
    [BT, BM], which the levels' scan ends with."""
    tl.static_assert((1 << LEVELS) == BT, "the levels' scan ends with d_1 ... d_t only over the whole chunk")
    o_t = tl.arange(0, BT)
    qx, kx = d, tl.full([BT, BM], 1.0, tl.float32)
    for l in tl.static_range(LEVELS):
        level = level_product(phi * qx, tl.trans(theta * kx), DOT_PRECISION)
        scores += tl.where(level_pairs(o_t[:, None], o_t[None, :], 1 << l), level, 0.0)
        qx, kx = next_level_factors(qx, kx, d, 1 << l, BT, BM)
    return scores, qx


@triton.jit
def logsumexp_kernel(logits, eta, lse, dominant, n_rows, M: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr):
    """For rows of a contiguous [n_rows, M] tensor: lse[r] = (top, log sum_j exp(logits[r, j] - top))
    with top the largest logit, and dominant[r] = the row j with theta = eta * alpha > 1/2, or -1.
    At most one row can have it (sum_j theta = eta <= 1), and only there may 1 - theta come near
    0: the backward treats it on its own. The two parts stay apart because their float32 sum
    rounds away the second at large logits (alpha off by 4e-4 relative at logits near 1e4);
    alpha = exp((x - top) - log_total) does not depend on the logits' offset, as softmax."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BM)
    m_r = rows < n_rows
    mask = m_r[:, None] & (cols < M)[None, :]
    x = tl.load(logits + rows[:, None].to(tl.int64) * M + cols[None, :], mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    top = tl.max(x, 1)
    top = tl.where(m_r, top, 0.0)
    total = tl.sum(tl.exp(x - top[:, None]), 1)
    total = tl.where(m_r, total, 1.0)
    eta_r = tl.load(eta + rows, mask=m_r, other=0.0).to(tl.float32)
    theta_top = eta_r / total  # theta of the largest logit
    tl.store(lse + 2 * rows, top, mask=m_r)
    tl.store(lse + 2 * rows + 1, tl.log(total), mask=m_r)
    tl.store(dominant + rows, tl.where(theta_top > 0.5, tl.argmax(x, 1), -1), mask=m_r)


@triton.jit
def chunk_rates(eta, mu, tok, m_t, m_next, H: tl.constexpr, GRAD: tl.constexpr):
    """The rates ``chunk_increment`` takes, two [len(tok)] float32: eta of the chunk's tokens and
    (GRAD) their mu, or (forward) eta of their next tokens in the chunk (0 past it). Loaded apart
    from the logits because Triton pipelines a walk's loads of logits and lse into shared memory
    on its own, but not these: at 2 bytes a token's element they are too narrow for an async copy."""
    eta_t = tl.load(eta + tok, mask=m_t, other=0.0).to(tl.float32)
    if GRAD:
        other = tl.load(mu + tok, mask=m_t, other=0.0).to(tl.float32)
    else:
        other = tl.load(eta + tok + H, mask=m_next, other=0.0).to(tl.float32)
    return eta_t, other


@triton.jit
def chunk_increment(
    x, logits, lse, rates, tok, m_t, m_next, o_m, m_m, o_v, m_v,
    H: tl.constexpr, M: tl.constexpr, V: tl.constexpr, GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One chunk's increment on rows o_m and columns o_v, [BM, BV] float32, and its decay
    d_1 ... d_last, [BM], with the chunk's ``chunk_rates``. Forward (x = v): the memory the chunk
    adds, sum_s theta_s d_{s+1} ... d_last v_s, with tok last first (``chunk_positions``). GRAD
    (x = do): the gradient the chunk adds on the memory before it, sum_u phi_u d_1 ... d_u do_u."""
    eta_t, other = rates
    alpha = routing_alpha(logits, lse, tok, m_t, o_m, m_m, M)
    x_t = tl.load(x + tok[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    theta = eta_t[:, None] * alpha
    d = 1.0 - theta
    if GRAD:
        w = other[:, None] * alpha * tl.cumprod(d, 0)  # phi_u d_1 ... d_u
    else:
        d_next = 1.0 - other[:, None] * routing_alpha(logits, lse, tok + H, m_next, o_m, m_m, M)
        w = theta * tl.cumprod(d_next, 0)  # d_{s+1} ... d_last: the forward's tokens come last first
    return tl.dot(tl.trans(w), x_t, input_precision=DOT_PRECISION), product(d, 0)


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
    """increments: [NT_total, H, M, V] float32, decays: [NT_total, H, M] float32: every chunk's
    increment and decay (``chunk_increment``), in parallel over chunks."""
    i_mv, i_tc, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_m, i_v = i_mv // tl.cdiv(V, BV), i_mv % tl.cdiv(V, BV)
    # the forward's products after each token as a forward scan: its tokens last first
    tok, m_t, m_next = chunk_tokens(chunk_indices, cu_seqlens, i_tc, i_h, T, NT, H, BT, IS_VARLEN, not GRAD)
    o_m = i_m * BM + tl.arange(0, BM)
    o_v = i_v * BV + tl.arange(0, BV)
    m_m, m_v = o_m < M, o_v < V
    rates = chunk_rates(eta, mu, tok, m_t, m_next, H, GRAD)
    inc, decay = chunk_increment(
        x, logits, lse, rates, tok, m_t, m_next, o_m, m_m, o_v, m_v, H, M, V, GRAD, DOT_PRECISION
    )
    row = (i_tc.to(tl.int64) * H + i_h) * M + o_m
    tl.store(increments + row[:, None] * V + o_v[None, :], inc, mask=m_m[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(decays + row, decay, mask=m_m)


@triton.jit
def state_tile(
    i_mv, i_n, i_h, h0, H: tl.constexpr, M: tl.constexpr, V: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
):  # fmt: skip
    """The block of the state that program (i_mv, sequence i_n, head i_h) of a walk over chunks
    carries: its rows and columns with their masks, the block's mask and offsets in an
    [N, H, M, V] state, and its start, [BM, BV] float32 (h0's block, or zeros)."""
    i_m, i_v = i_mv // tl.cdiv(V, BV), i_mv % tl.cdiv(V, BV)
    o_m = i_m * BM + tl.arange(0, BM)
    o_v = i_v * BV + tl.arange(0, BV)
    m_m, m_v = o_m < M, o_v < V
    m_state = m_m[:, None] & m_v[None, :]
    state_offsets = ((i_n.to(tl.int64) * H + i_h) * M + o_m[:, None]) * V + o_v[None, :]
    s = tl.zeros([BM, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        s += tl.load(h0 + state_offsets, mask=m_state, other=0.0).to(tl.float32)
    return o_m, o_v, m_m, m_v, m_state, state_offsets, s


@triton.heuristics(STATE_AND_VARLEN_SWITCHES)
@triton.jit(do_not_specialize=["NT"])
def chunk_state_scan_kernel(
    increments,
    decays,
    states,
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
    """Turns per-chunk increments ([NT_total, H, M, V] float32) into per-chunk states ([NT_total,
    H, M, V], ``launch.chunk_state_dtype``; float32 ones may be the increments, overwritten),
    element by element, in float32: s <- decay * s + increment.
    Forward: h0 is the initial state, slot c ends up with the memory at the start of chunk c,
    ht gets the final state. REVERSE: h0 is the gradient on the final state, slot c ends up
    with the gradient on the memory at the end of chunk c from everything after it, ht gets
    the gradient on the initial state."""
    i_mv, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first, count = sequence_chunks(chunk_offsets, i_n, NT, IS_VARLEN)
    o_m, o_v, m_m, m_v, m_state, state_offsets, s = state_tile(i_mv, i_n, i_h, h0, H, M, V, BM, BV, USE_INITIAL_STATE)
    # the scan is latency-bound: the next chunk's increment is loaded before this one is used
    step = -1 if REVERSE else 1
    c = first + (count - 1) * (step < 0)
    row = (c * H + i_h) * M + o_m
    m_any = m_m & (o_m * 0 < count)  # no chunk at all: an empty sequence
    inc = tl.load(increments + row[:, None] * V + o_v[None, :], mask=m_any[:, None] & m_v[None, :], other=0.0)
    decay = tl.load(decays + row, mask=m_any, other=0.0)
    for i in range(count):
        c_next = c + step
        row_next = (c_next * H + i_h) * M + o_m
        m_next = m_m & (o_m * 0 + i + 1 < count)
        inc_next = tl.load(
            increments + row_next[:, None] * V + o_v[None, :], mask=m_next[:, None] & m_v[None, :], other=0.0
        )
        decay_next = tl.load(decays + row_next, mask=m_next, other=0.0)
        tl.store(states + row[:, None] * V + o_v[None, :], s.to(states.dtype.element_ty), mask=m_state)
        s = s * decay[:, None] + inc
        c, row, inc, decay = c_next, row_next, inc_next, decay_next
    if STORE_FINAL_STATE:
        tl.store(ht + state_offsets, s, mask=m_state)


@triton.heuristics(STATE_AND_VARLEN_SWITCHES)
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_state_walk_kernel(
    x,
    logits,
    lse,
    eta,
    mu,
    states,
    h0,
    ht,
    chunk_offsets,
    cu_seqlens,
    T,
    NT,
    H: tl.constexpr,
    M: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    REVERSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The increments and the scan in one pass (FLA's ``chunk_fwd_h``): one program per (block of
    rows and columns, sequence, head) walks the sequence's chunks, forms each one's increment
    (``chunk_increment``) and folds it in, so that no increment goes through memory. ``states``,
    h0 and ht as in ``chunk_state_scan_kernel``; REVERSE walks from the last chunk, with x = do.
    Its programs are one per block of the state, so it needs many sequences and heads
    (``launch.chunk_states``)."""
    i_mv, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first, count = sequence_chunks(chunk_offsets, i_n, NT, IS_VARLEN)
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_m, o_v, m_m, m_v, m_state, state_offsets, s = state_tile(i_mv, i_n, i_h, h0, H, M, V, BM, BV, USE_INITIAL_STATE)
    # each step loads the next chunk's rates before it works on its own, so that their latency
    # overlaps a step (Triton pipelines the other loads itself: ``chunk_rates``); the last step
    # loads its own chunk's again rather than one past the sequence
    if REVERSE:
        # an empty packed sequence starts at chunk 0, not -1, whose tokens would pass the masks
        step, i_c = -1, tl.maximum(count - 1, 0)
    else:
        step, i_c = 1, count * 0
    tok, m_t, m_next = tokens_of_chunk(i_c, bos, eos, i_h, H, BT, not REVERSE)
    rates = chunk_rates(eta, mu, tok, m_t, m_next, H, REVERSE)
    for i in range(count):
        i_next = i_c + tl.where(i + 1 < count, step, 0)
        tok_next, m_t_next, m_next_next = tokens_of_chunk(i_next, bos, eos, i_h, H, BT, not REVERSE)
        rates_next = chunk_rates(eta, mu, tok_next, m_t_next, m_next_next, H, REVERSE)
        row = ((first + i_c) * H + i_h) * M + o_m
        tl.store(states + row[:, None] * V + o_v[None, :], s.to(states.dtype.element_ty), mask=m_state)
        inc, decay = chunk_increment(
            x, logits, lse, rates, tok, m_t, m_next, o_m, m_m, o_v, m_v, H, M, V, REVERSE, DOT_PRECISION
        )
        s = s * decay[:, None] + inc
        i_c, tok, m_t, m_next, rates = i_next, tok_next, m_t_next, m_next_next, rates_next
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
    scores_out,
    chunk_indices,
    cu_seqlens,
    T,
    NT,
    H: tl.constexpr,
    M: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    LEVELS: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STORE_SCORES: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """states: [NT_total, H, M, V] memory at each chunk's start (``launch.chunk_state_dtype``);
    o: [B, T, H, V] in v's dtype; scores_out: [B, T, H, BT] float32, row t of the chunk's scores A
    (diagonal included), for the backward's dv, written only with STORE_SCORES. One program per
    (chunk, head, block of value columns) loops over blocks of BM rows, accumulating (phi * P) h
    and the scores A; LEVELS = log2(BT)."""
    i_tc, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tok, m_t, _ = chunk_tokens(chunk_indices, cu_seqlens, i_tc, i_h, T, NT, H, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V

    out = tl.zeros([BT, BV], dtype=tl.float32)
    scores = tl.zeros([BT, BT], dtype=tl.float32)
    own = tl.zeros([BT], dtype=tl.float32)  # the diagonal of A: sum_j phi_t theta_t
    gates = (logits, lse, eta, mu)
    for i_m in range(tl.cdiv(M, BM)):
        o_m = i_m * BM + tl.arange(0, BM)
        m_m = o_m < M
        theta, phi, d = chunk_gates(*gates, tok, m_t, o_m, m_m, M, True)
        row = (i_tc.to(tl.int64) * H + i_h) * M + o_m
        m_state = m_m[:, None] & m_v[None, :]
        own += tl.sum(phi * theta, 1)
        scores, decay_in = intra_chunk_scores(scores, theta, phi, d, BT, BM, LEVELS, DOT_PRECISION)
        h = tl.load(states + row[:, None] * V + o_v[None, :], mask=m_state, other=0.0).to(tl.float32)
        out = tl.dot(phi * decay_in, h, out, input_precision=DOT_PRECISION)
    scores += tl.where(o_t[:, None] == o_t[None, :], own[:, None], 0.0)
    if STORE_SCORES and i_v == 0:
        tl.store(scores_out + tok[:, None] * BT + o_t[None, :], scores, mask=m_t[:, None])
    v_t = tl.load(v + tok[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    out = tl.dot(scores, v_t, out, input_precision=DOT_PRECISION)
    tl.store(o + tok[:, None] * V + o_v[None, :], out.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
