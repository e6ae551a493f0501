"""Triton backward kernel of dense Factorization Memory, one program per sub-chunk.

With the memory at every chunk's start (saved by the forward) and the gradient on the memory
at every chunk's end (the reverse scan of ``chunk_kernels.py``), a program rebuilds the
memory at the start of its 16-token sub-chunk, h, and the gradient on it at the sub-chunk's
end, dh, and then, per row j and token t, with D_t the gradient on h_t and b the
cumulative log-decay inside the sub-chunk:

    dphi_t[j]   = <do_t, h_t[j]>
    dtheta_t[j] = <D_t[j], v_t> - <D_t[j], h_{t-1}[j]>
    dv_t        = sum_j theta_t[j] D_t[j]

The decay term <D_t, h_{t-1}> comes from the gradient on the log-decay,
dg_t = (1 - theta_t) <D_t, h_{t-1}>, a suffix sum inside the sub-chunk (as in GLA), divided
by 1 - theta_t. That division loses every digit as theta -> 1, so the one row per token
that can have theta > 1/2 (sum_j theta_t[j] = eta_t <= 1) is computed directly instead,
from its own row of h and dh. The chain rule through theta = eta * alpha, phi = mu * alpha
and the softmax gives the gradients on logits, eta and mu.
"""

import triton
import triton.language as tl

from fla_factmem.ops.factorization_memory.chunk_kernels import (
    VARLEN_SWITCH,
    advance_state,
    carry_gradient_back,
    chunk_coordinates,
    routing_gates,
)


@triton.heuristics(VARLEN_SWITCH)
@triton.jit(do_not_specialize=["T", "NT"])
def chunk_bwd_kernel(
    v,
    logits,
    lse,
    eta,
    mu,
    do,
    states,
    grad_states,
    dv,
    dlogits,
    deta,
    dmu,
    dalpha,
    chunk_indices,
    cu_seqlens,
    T,
    NT,
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
    """states: [NT_total, H, M, V] memory at each chunk's start; grad_states: [NT_total, H, M, V]
    gradient on the memory at each chunk's end from the tokens after it. Writes dv, dlogits,
    deta, dmu in their inputs' layouts. dalpha: [B, T, H, M] float32 scratch, used only when M
    spans more than one block of BM rows (the softmax needs the whole row). BV covers V."""
    i_ts, i_h = tl.program_id(0), tl.program_id(1)
    NS: tl.constexpr = BT // BS
    i_tc, i_s = i_ts // NS, i_ts % NS
    i_n, i_c, bos, eos = chunk_coordinates(i_tc, chunk_indices, cu_seqlens, T, NT, IS_VARLEN)
    length = eos - bos
    o_s = tl.arange(0, BS)
    rows = i_c * BT + i_s * BS + o_s
    m_t = rows < length
    tok = (bos + rows) * H + i_h
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    v_t = tl.load(v + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
    do_t = tl.load(do + tok[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
    do_v = tl.dot(do_t, tl.trans(v_t), input_precision=DOT_PRECISION)  # [t, s]: <do_t, v_s>
    causal = o_s[:, None] >= o_s[None, :]

    dv_acc = tl.zeros([BS, BV], dtype=tl.float32)
    scores = tl.zeros([BS, BS], dtype=tl.float32)
    dmu_t = tl.zeros([BS], dtype=tl.float32)
    deta_t = tl.zeros([BS], dtype=tl.float32)
    for i_m in range(tl.cdiv(M, BM)):
        o_m = i_m * BM + tl.arange(0, BM)
        m_m = o_m < M
        row = (i_tc.to(tl.int64) * H + i_h) * M + o_m
        m_state = m_m[:, None] & m_v[None, :]
        # the memory at the start of the sub-chunk, transposed: [BV, BM]
        hT = tl.load(states + row[None, :] * V + o_v[:, None], mask=m_v[:, None] & m_m[None, :], other=0.0)
        for i_p in range(i_s):
            prev = i_c * BT + i_p * BS + o_s
            tok_p = (bos + prev) * H + i_h
            m_p = prev < length
            _, theta_p, _, g_p, _, _ = routing_gates(logits, lse, eta, mu, tok_p, m_p, o_m, m_m, M)
            v_p = tl.load(v + tok_p[:, None] * V + o_v[None, :], mask=m_p[:, None] & m_v[None, :], other=0.0)
            hT = advance_state(hT, v_p.to(tl.float32), theta_p, g_p, True, DOT_PRECISION)
        # the gradient on the memory at the end of the sub-chunk, in both layouts, because a
        # dot accumulator is never transposed (Triton 3.6 miscompiles that on Hopper)
        dh = tl.load(grad_states + row[:, None] * V + o_v[None, :], mask=m_state, other=0.0)
        dhT = tl.load(grad_states + row[None, :] * V + o_v[:, None], mask=m_v[:, None] & m_m[None, :], other=0.0)
        for i_q in range(NS - 1 - i_s):
            nxt = i_c * BT + (NS - 1 - i_q) * BS + o_s
            tok_q = (bos + nxt) * H + i_h
            m_q = nxt < length
            _, _, phi_q, g_q, _, _ = routing_gates(logits, lse, eta, mu, tok_q, m_q, o_m, m_m, M)
            do_q = tl.load(do + tok_q[:, None] * V + o_v[None, :], mask=m_q[:, None] & m_v[None, :], other=0.0)
            do_q = do_q.to(tl.float32)
            dh = carry_gradient_back(dh, do_q, phi_q, g_q, False, DOT_PRECISION)
            dhT = carry_gradient_back(dhT, do_q, phi_q, g_q, True, DOT_PRECISION)

        alpha, theta, phi, g, eta_t, mu_t = routing_gates(logits, lse, eta, mu, tok, m_t, o_m, m_m, M)
        b = tl.cumsum(g, 0)
        b_last = tl.sum(g, 0)
        decay_in = tl.exp(b)  # from the sub-chunk's start through t
        decay_out = tl.exp(tl.minimum(b_last[None, :] - b, 0.0))  # after t to the sub-chunk's end
        pair = tl.exp(tl.where(causal[:, :, None], b[:, None, :] - b[None, :, :], float("-inf")))  # [t, s, j]

        dq = decay_in * tl.dot(do_t, hT, input_precision=DOT_PRECISION)
        dq += tl.sum(pair * theta[None, :, :] * do_v[:, :, None], 1)
        dk = decay_out * tl.dot(v_t, dhT, input_precision=DOT_PRECISION)
        dk += tl.sum(pair * phi[:, None, :] * do_v[:, :, None], 0)
        scores += tl.sum(pair * phi[:, None, :] * theta[None, :, :], 2)
        w_out = theta * decay_out
        dv_acc = tl.dot(w_out, dh, dv_acc, input_precision=DOT_PRECISION)

        # dg_t = (1 - theta_t) <D_t, h_{t-1}>: the suffix sum of phi dq - theta dk plus <dh, h_end>
        hT_end = tl.dot(tl.trans(v_t), w_out, hT * tl.exp(b_last)[None, :], input_precision=DOT_PRECISION)
        dg = tl.cumsum(phi * dq - theta * dk, 0, reverse=True) + tl.sum(dhT * hT_end, 0)[None, :]

        # the row j* with theta > 1/2, directly: <D_t[j*], h_{t-1}[j*]>, its column of every
        # [t, s, j] quantity picked by a select (exact, unlike a one-hot dot in tf32)
        special = theta > 0.5
        x_pick = tl.zeros([BS], dtype=tl.float32)
        if tl.sum(special.to(tl.int32)) > 0:  # most blocks have no such row
            pick = special[:, None, :]
            b_pick = tl.sum(tl.where(pick, b[None, :, :], 0.0), 2)  # [t, s]: b_s[j*(t)]
            theta_pick = tl.sum(tl.where(pick, theta[None, :, :], 0.0), 2)
            phi_pick = tl.sum(tl.where(pick, phi[None, :, :], 0.0), 2)
            b_own = tl.sum(tl.where(special, b, 0.0), 1)
            b_prev = b_own - tl.sum(tl.where(special, g, 0.0), 1)
            # h_{t-1}[j*] = exp(b_{t-1}) h[j*] + sum_{s < t} theta_s exp(b_{t-1} - b_s) v_s
            before = theta_pick * tl.exp(tl.minimum(b_prev[:, None] - b_pick, 0.0))
            before = tl.where(o_s[:, None] > o_s[None, :], before, 0.0)
            # D_t[j*] = exp(b_last - b_t) dh[j*] + sum_{u >= t} phi_u exp(b_u - b_t) do_u
            after = phi_pick * tl.exp(tl.minimum(b_pick - b_own[:, None], 0.0))
            after = tl.where(o_s[:, None] <= o_s[None, :], after, 0.0)
            d_pick = tl.dot(tl.where(special, decay_out, 0.0), dh, input_precision=DOT_PRECISION)
            d_pick = tl.dot(after, do_t, d_pick, input_precision=DOT_PRECISION)
            x_pick = tl.sum(d_pick * tl.dot(before, v_t, input_precision=DOT_PRECISION), 1)
            decay_prev = tl.where(special, tl.exp(tl.minimum(b - g, 0.0)), 0.0)
            x_pick += tl.sum(decay_prev * tl.dot(d_pick, hT, input_precision=DOT_PRECISION), 1)

        dtheta = dk - tl.where(special, x_pick[:, None], dg / tl.where(special, 1.0, 1.0 - theta))
        dalpha_t = mu_t[:, None] * dq + eta_t[:, None] * dtheta
        dmu_t += tl.sum(alpha * dq, 1)
        deta_t += tl.sum(alpha * dtheta, 1)
        m_tm = m_t[:, None] & m_m[None, :]
        if M <= BM:
            total = mu_t * dmu_t + eta_t * deta_t  # sum_j alpha dalpha
            grad = alpha * (dalpha_t - total[:, None])
            tl.store(dlogits + tok[:, None] * M + o_m[None, :], grad.to(dlogits.dtype.element_ty), mask=m_tm)
        else:
            tl.store(dalpha + tok[:, None] * M + o_m[None, :], dalpha_t, mask=m_tm)

    dv_t = dv_acc + tl.sum(scores[:, :, None] * do_t[:, None, :], 0)
    tl.store(dv + tok[:, None] * V + o_v[None, :], dv_t.to(dv.dtype.element_ty), mask=m_tv)
    tl.store(deta + tok, deta_t.to(deta.dtype.element_ty), mask=m_t)
    tl.store(dmu + tok, dmu_t.to(dmu.dtype.element_ty), mask=m_t)
    if M > BM:
        # softmax backward over the whole row, from the scratch this program just wrote
        eta_t = tl.load(eta + tok, mask=m_t, other=0.0).to(tl.float32)
        mu_t = tl.load(mu + tok, mask=m_t, other=0.0).to(tl.float32)
        total = mu_t * dmu_t + eta_t * deta_t
        tl.debug_barrier()
        for i_m in range(tl.cdiv(M, BM)):
            o_m = i_m * BM + tl.arange(0, BM)
            m_tm = m_t[:, None] & (o_m < M)[None, :]
            alpha, _, _, _, _, _ = routing_gates(logits, lse, eta, mu, tok, m_t, o_m, o_m < M, M)
            dalpha_t = tl.load(dalpha + tok[:, None] * M + o_m[None, :], mask=m_tm, other=0.0)
            grad = alpha * (dalpha_t - total[:, None])
            tl.store(dlogits + tok[:, None] * M + o_m[None, :], grad.to(dlogits.dtype.element_ty), mask=m_tm)
