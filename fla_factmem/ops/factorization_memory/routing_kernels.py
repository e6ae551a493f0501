"""Triton routing of the sparse variant: each token's top K of its M logits and their alpha,
the softmax re-normalised over them (theta = eta * alpha and phi = mu * alpha are formed where
the picks are sorted into events, ``chunk_sparse_kernels.sparse_events_kernel``)."""

import triton
import triton.language as tl

from fla_factmem.ops.factorization_memory.chunk_bwd_kernels import is_top_row


@triton.jit
def picks_softmax(values):
    """alpha over the picks of each row of values [BR, KB] (-inf past K): the softmax
    re-normalised over them, the same arithmetic in training's routing and in decoding."""
    alpha = tl.exp(values - tl.max(values, 1)[:, None])
    return alpha / tl.sum(alpha, 1)[:, None]


@triton.jit
def ranking_keys(x, rows, valid, ROW_BITS: tl.constexpr):
    """One integer per logit that orders as the logits do, ties to the lower row, so that one
    max finds both the value and its row: the logit's bits made monotone (the float's sign and
    magnitude read as a signed integer, -0 as +0), then 2^R - 1 - row in the low R = ROW_BITS
    bits: int32 keys for R = 16 (16-bit logits, rows < 2^16), int64 for R = 32. x: logits in
    their dtype; rows: int32, broadcast to x; invalid entries get the lowest key. Every real
    logit, -inf included, outranks them."""
    # one branch and one return each: the compiler (unlike the interpreter) would still build
    # the code after a return in a branch, as if no branch had been taken
    if x.dtype.primitive_bitwidth == 16:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)
    else:
        bits = x.to(tl.int32, bitcast=True)
    SIGN: tl.constexpr = -(2 ** (x.dtype.primitive_bitwidth - 1))
    bits = tl.where(bits == SIGN, 0, bits)
    monotone = tl.where(bits >= 0, bits, -1 - (bits & (-SIGN - 1)))
    if ROW_BITS == 16:
        keys = tl.where(valid, monotone * 2**16 + (2**16 - 1 - rows), -(2**31))
    else:
        keys = tl.where(valid, monotone.to(tl.int64) * 2**32 + (2**32 - 1 - rows.to(tl.int64)), -(2**63))
    return keys


@triton.jit
def logit_and_row(keys, dtype: tl.constexpr, ROW_BITS: tl.constexpr):
    """The float32 logit and the int32 row that ``ranking_keys`` packed into keys, from logits
    of ``dtype``."""
    monotone = keys >> ROW_BITS
    row = (2**ROW_BITS - 1 - (keys & (2**ROW_BITS - 1))).to(tl.int32)
    W: tl.constexpr = dtype.primitive_bitwidth
    bits = tl.where(monotone >= 0, monotone, -(2 ** (W - 1)) - 1 - monotone)
    bits = bits.to(tl.int16) if W == 16 else bits.to(tl.int32)
    return bits.to(dtype, bitcast=True).to(tl.float32), row


@triton.jit
def top_k(keys, K: tl.constexpr, KB: tl.constexpr):
    """The K largest of each keys[r] (keys [BR, A, C] from ``ranking_keys``, the valid ones
    distinct), [BR, KB], largest first, the lowest key in lanes k >= K. keys is 3-D so that the
    grouped search of ``top_k_logits`` needs no reshape (Triton 3.6 fails to compile a reduction
    of a reshaped tile on Hopper)."""
    LOWEST: tl.constexpr = -(2 ** (keys.dtype.primitive_bitwidth - 1))
    o_k = tl.arange(0, KB)[None, :]
    top_keys = tl.full([keys.shape[0], KB], LOWEST, dtype=keys.dtype)
    for k in range(K):
        top = tl.max(tl.max(keys, 2), 1)
        top_keys = tl.where(o_k == k, top[:, None], top_keys)
        keys = tl.where(keys == top[:, None, None], LOWEST, keys)
    return top_keys


@triton.jit
def top_k_logits(
    logits, start, m_r, M: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, KB: tl.constexpr, G: tl.constexpr
):
    """The top K of the M logits at ``logits + start[r]`` for each row r (start [BR] int64, m_r
    [BR] which rows exist), largest first, ties to the lower row: their rows (int32) and values
    (float32), [BR, KB] each; lanes k >= K get row 0 and value -inf. A token whose logits are
    all -inf gets them as values, hence NaN weights, as the softmax of the definition does.

    In groups of G logits (G > 1 needs BM // G >= 2 KB, so that more than K groups hold logits):
    the top K lie in the K groups of the largest maxima, ties to the lower group (a logit outside
    them is outranked by those K maxima), so K searches over the BM // G group maxima and K over
    the K * G logits of the chosen groups replace K searches over all BM logits. The groups'
    maxima are taken on the logits themselves and only they get ranking keys: building a key for
    every logit took a quarter of the routing's instructions. A NaN logit ranks its group as
    +inf (a positive NaN, first in the ranking keys' order, is then picked unless K lower groups
    hold +inf or NaN too; picks among NaN logits are otherwise unspecified: the inputs hold none)."""
    dtype: tl.constexpr = logits.dtype.element_ty
    # rows in the low 16 bits of 32-bit keys where they fit (launch.logits_per_warp)
    ROW_BITS: tl.constexpr = 16 if (dtype.primitive_bitwidth == 16 and M <= 2**16) else 32
    NG: tl.constexpr = BM // G
    o_g, o_i = tl.arange(0, NG), tl.arange(0, G)
    in_row = (o_g[:, None] * G + o_i[None, :])[None, :, :]  # [1, NG, G]
    m_in = m_r[:, None, None] & (in_row < M)
    x = tl.load(logits + start[:, None, None] + in_row, mask=m_in, other=float("-inf"))
    if G > 1:
        # exact: a group's maximum is one of its logits. tl.max skips NaN, so NaN is replaced by
        # +inf first (tl.reduce with a NaN-propagating combine ran some 20x slower under the
        # interpreter). In float32: the interpreter compares bfloat16 wrongly
        x = x.to(tl.float32)
        group_max = tl.max(tl.where(x == x, x, float("inf")), 2).to(dtype)
        m_g = m_r[:, None] & (o_g * G < M)[None, :]
        group_keys = ranking_keys(group_max, o_g[None, :], m_g, ROW_BITS)
        groups = logit_and_row(top_k(group_keys[:, :, None], K, KB), dtype, ROW_BITS)[1]
        rows = groups[:, :, None] * G + o_i[None, None, :]  # [BR, KB, G]
        m_c = (tl.arange(0, KB) < K)[None, :, None] & (rows < M) & m_r[:, None, None]
        x = tl.load(logits + start[:, None, None] + rows, mask=m_c, other=0.0)
        keys = ranking_keys(x, rows, m_c, ROW_BITS)
    else:
        keys = ranking_keys(x, in_row, m_in, ROW_BITS)
    values, rows = logit_and_row(top_k(keys, K, KB), dtype, ROW_BITS)
    in_k = (tl.arange(0, KB) < K)[None, :]
    return tl.where(in_k, rows, 0), tl.where(in_k, values, float("-inf"))


@triton.jit
def sparse_routing_kernel(
    logits,
    picked_rows,
    alpha,
    n_rows,
    stride_logits,
    LOGITS_UNIT: tl.constexpr,
    H: tl.constexpr,
    M: tl.constexpr,
    K: tl.constexpr,
    BR: tl.constexpr,
    BM: tl.constexpr,
    KB: tl.constexpr,
    G: tl.constexpr,
):
    """For BR of the n_rows = tokens * H rows of the logits (token t's H rows of M packed, from
    t * stride_logits * LOGITS_UNIT: ``launch.stride_unit``): picked_rows [n_rows, K] int32, the top-K
    rows largest first, and their alpha [n_rows, K] float32, the softmax re-normalised over them;
    G as in ``top_k_logits``."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_k = tl.arange(0, KB)
    m_r = o_r < n_rows
    start = (o_r // H).to(tl.int64) * stride_logits * LOGITS_UNIT + (o_r % H) * M
    rows, top = top_k_logits(logits, start, m_r, M, K, BM, KB, G)
    out = o_r[:, None].to(tl.int64) * K + o_k[None, :]
    m_out = m_r[:, None] & (o_k < K)[None, :]
    tl.store(picked_rows + out, rows, mask=m_out)
    tl.store(alpha + out, picks_softmax(top), mask=m_out)


@triton.jit
def sparse_routing_bwd_kernel(
    alpha,
    eta,
    mu,
    picked_rows,
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
    PICKS_ONLY: tl.constexpr,
):
    """For BR rows of the flat [n_rows, M] logits: from the gradients on the picks' theta and
    phi (pick_dtheta, pick_dphi [n_rows, K] float32; their rows in picked_rows [n_rows, K]
    int32), the gradients through theta = eta * alpha, phi = mu * alpha and the softmax
    re-normalised over the picks (alpha [n_rows, K] float32, as the routing left it): dlogits
    [n_rows, M], whole rows, 0 outside the picks (rows nobody picks get no gradient), written BM
    at a time, or with ``PICKS_ONLY`` [n_rows, K], the picks' own (the op was given only their
    logits); deta, dmu [n_rows]. As in the dense backward (``chunk_bwd_kernels.is_top_row``), a
    pick with alpha > 3/4 gets minus the sum of the other picks' gradients: computed directly it
    is a difference of nearly equal numbers, and with every token's top logit 16 above its others
    (alpha = 1 - 4e-7) dlogits came out 0.22 off (relative) against a float64 reference."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_k = tl.arange(0, KB)
    m_r = o_r < n_rows
    m_rk = m_r[:, None] & (o_k < K)[None, :]
    pick = o_r[:, None].to(tl.int64) * K + o_k[None, :]
    alpha_k = tl.load(alpha + pick, mask=m_rk, other=0.0)
    dtheta = tl.load(pick_dtheta + pick, mask=m_rk, other=0.0)
    dphi = tl.load(pick_dphi + pick, mask=m_rk, other=0.0)
    eta_r = tl.load(eta + o_r, mask=m_r, other=0.0).to(tl.float32)
    mu_r = tl.load(mu + o_r, mask=m_r, other=0.0).to(tl.float32)
    dalpha = mu_r[:, None] * dphi + eta_r[:, None] * dtheta
    grad = alpha_k * (dalpha - tl.sum(alpha_k * dalpha, 1)[:, None])
    top = is_top_row(alpha_k)
    # with one pick (alpha = 1) the gradient is exactly 0: the others' sum is empty
    grad = tl.where(top, -tl.sum(tl.where(top, 0.0, grad), 1)[:, None], grad)
    if PICKS_ONLY:
        tl.store(dlogits + pick, grad.to(dlogits.dtype.element_ty), mask=m_rk)
    else:
        # zeros over whole rows, then the picks over them: one pass over dlogits, no zeroed tensor
        # made beforehand; the barrier orders the two stores, which other threads may make
        o_m = tl.arange(0, BM)
        row_start = o_r.to(tl.int64)[:, None] * M
        for m0 in range(0, M, BM):
            m_rm = m_r[:, None] & (m0 + o_m < M)[None, :]
            tl.store(dlogits + row_start + m0 + o_m[None, :], tl.zeros([BR, BM], dlogits.dtype.element_ty), mask=m_rm)
        tl.debug_barrier()
        rows = tl.load(picked_rows + pick, mask=m_rk, other=0)
        tl.store(dlogits + row_start + rows, grad.to(dlogits.dtype.element_ty), mask=m_rk)
    tl.store(deta + o_r, tl.sum(alpha_k * dtheta, 1).to(deta.dtype.element_ty), mask=m_r)
    tl.store(dmu + o_r, tl.sum(alpha_k * dphi, 1).to(dmu.dtype.element_ty), mask=m_r)
