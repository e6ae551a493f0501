"""Triton decoding kernels of Factorization Memory: token by token, one launch for all sequences
and heads, one program per (sequence, head, block of value columns).

Dense: the program holds all M rows of the memory in registers; per token it reads M logits,
eta, mu and V values, and the state is read and written once per call.
Sparse: the state stays in memory and is updated in place; per token the program reads the M
logits, picks the top K and reads and writes only those K rows.
Both read logits, eta and mu at a stride per token with each token's heads packed, so that views
into one projection's output need no copy: ``stride_eta`` and ``stride_mu`` in elements,
``stride_logits`` in units of LOGITS_UNIT elements (``launch.stride_unit``).
"""

import triton
import triton.language as tl

from fla_factmem.ops.factorization_memory.chunk_kernels import (
    STATE_AND_VARLEN_SWITCHES,
    VARLEN_SWITCH,
    sequence_bounds,
)
from fla_factmem.ops.factorization_memory.routing_kernels import picks_softmax, top_k_logits


@triton.heuristics(STATE_AND_VARLEN_SWITCHES)
@triton.jit(do_not_specialize=["T"])
def fused_recurrent_fwd_kernel(
    v,
    logits,
    eta,
    mu,
    h0,
    o,
    ht,
    cu_seqlens,
    T,
    stride_logits,
    stride_eta,
    stride_mu,
    LOGITS_UNIT: tl.constexpr,
    H: tl.constexpr,
    M: tl.constexpr,
    V: tl.constexpr,
    BM: tl.constexpr,
    BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
    STORE_FINAL_STATE: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """v, o: [B, T, H, V]; logits [B, T, H, M], eta and mu [B, T, H] at their token strides;
    h0 (USE_INITIAL_STATE) and ht (STORE_FINAL_STATE): [N, H, M, V] float32, ht may be h0 itself
    (each program reads its block of columns whole before it writes it). The program's [BM, BV]
    block of the state stays in registers through the tokens."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)

    o_m = tl.arange(0, BM)
    o_v = i_v * BV + tl.arange(0, BV)
    m_m, m_v = o_m < M, o_v < V
    state_offsets = (i_nh.to(tl.int64) * M + o_m[:, None]) * V + o_v[None, :]
    m_state = m_m[:, None] & m_v[None, :]
    # loaded as it is, not added to zeros: the sum cost 1 to 2 us of a 24 us step at M = 256 on
    # an H200 (B = 64, H = 8, V = 64, CUDA graph)
    if USE_INITIAL_STATE:
        h = tl.load(h0 + state_offsets, mask=m_state, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BM, BV], dtype=tl.float32)

    for t in range(bos, eos):
        tok = t * H + i_h
        start = t * stride_logits * LOGITS_UNIT + i_h * M
        x = tl.load(logits + start + o_m, mask=m_m, other=float("-inf")).to(tl.float32)
        alpha = tl.exp(x - tl.max(x, 0))
        alpha = alpha / tl.sum(alpha, 0)
        theta = tl.load(eta + t * stride_eta + i_h).to(tl.float32) * alpha
        phi = tl.load(mu + t * stride_mu + i_h).to(tl.float32) * alpha
        v_t = tl.load(v + tok * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        h = (1.0 - theta[:, None]) * h + theta[:, None] * v_t[None, :]
        o_t = tl.sum(phi[:, None] * h, 0)
        tl.store(o + tok * V + o_v, o_t.to(o.dtype.element_ty), mask=m_v)

    if STORE_FINAL_STATE:
        tl.store(ht + state_offsets, h, mask=m_state)


@triton.heuristics(VARLEN_SWITCH)
@triton.jit(do_not_specialize=["T"])
def fused_recurrent_sparse_fwd_kernel(
    v,
    logits,
    eta,
    mu,
    state,
    o,
    cu_seqlens,
    T,
    stride_logits,
    stride_eta,
    stride_mu,
    LOGITS_UNIT: tl.constexpr,
    H: tl.constexpr,
    M: tl.constexpr,
    V: tl.constexpr,
    K: tl.constexpr,
    BM: tl.constexpr,
    KB: tl.constexpr,
    G: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """state: [N, H, M, V] float32, updated in place. Per token: the top K of the M logits, alpha
    re-normalised over them, and the K rows gathered, updated, written back and merged into o;
    the other M - K rows are neither read nor written."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)

    o_k = tl.arange(0, KB)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_rows = (o_k < K)[:, None] & m_v[None, :]
    head_state = state + i_nh.to(tl.int64) * M * V
    for t in range(bos, eos):
        tok = t * H + i_h
        one_row = tl.zeros([1], dtype=tl.int64)
        start = (one_row + t) * stride_logits * LOGITS_UNIT + i_h * M
        rows, top = top_k_logits(logits, start, one_row == 0, M, K, BM, KB, G)
        rows, alpha = tl.reshape(rows, [KB]), tl.reshape(picks_softmax(top), [KB])
        theta = tl.load(eta + t * stride_eta + i_h).to(tl.float32) * alpha
        phi = tl.load(mu + t * stride_mu + i_h).to(tl.float32) * alpha
        v_t = tl.load(v + tok * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        ptrs = head_state + rows[:, None] * V + o_v[None, :]
        h = tl.load(ptrs, mask=m_rows, other=0.0)
        h = (1.0 - theta[:, None]) * h + theta[:, None] * v_t[None, :]
        tl.store(ptrs, h, mask=m_rows)
        tl.store(o + tok * V + o_v, tl.sum(phi[:, None] * h, 0).to(o.dtype.element_ty), mask=m_v)
        # the next token may read rows written here, by other threads of this program
        tl.debug_barrier()
