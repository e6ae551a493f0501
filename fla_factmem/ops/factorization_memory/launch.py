"""Host side of the Triton kernels: shapes, block sizes and launches."""

from __future__ import annotations

import torch
import triton

from fla_factmem.ops.factorization_memory.chunk_kernels import chunk_fwd_kernel, logsumexp_kernel
from fla_factmem.ops.factorization_memory.fused_recurrent_kernels import fused_recurrent_fwd_kernel
from fla_factmem.ops.factorization_memory.routing import DENSE_TRITON_MAX_M

SUB_CHUNK = 16  # BT: tokens per step of the kernels' walk (the smallest tl.dot tile)
MAX_BLOCK_M = 64  # rows of the memory per program: bounds the [BT, BT, BM] pairwise-decay tile


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, M]`` logits -> ``[B, T, H]`` float32 log-sum-exp over M."""
    logits = logits.contiguous()
    M = logits.shape[-1]
    lse = torch.empty(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    n_rows = lse.numel()
    BR = 16
    logsumexp_kernel[(triton.cdiv(n_rows, BR),)](logits, lse, n_rows, M=M, BR=BR, BM=triton.next_power_of_2(M))
    return lse


def _prepare(v, logits, eta, mu, initial_state, output_final_state, cu_seqlens):
    """Checks M, makes the inputs contiguous and allocates the final state:
    ``(v, logits, eta, mu, h0, ht, N)`` with N the number of sequences."""
    B, _, H, V = v.shape
    M = logits.shape[-1]
    if M > DENSE_TRITON_MAX_M:
        raise ValueError(f"the dense Triton kernels take M <= {DENSE_TRITON_MAX_M}; got M = {M}")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    ht = torch.empty(N, H, M, V, dtype=torch.float32, device=v.device) if output_final_state else None
    h0 = initial_state.contiguous() if initial_state is not None else None
    return (*(x.contiguous() for x in (v, logits, eta, mu)), h0, ht, N)


def chunk_fwd(
    v: torch.Tensor,
    logits: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    block_v: int | None = None,
    num_warps: int = 8,
    num_stages: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense forward. Shapes as in ``chunk_factorization_memory``; returns ``(o, final state or None)``.
    ``block_v``, ``num_warps`` and ``num_stages`` override the launch configuration (for tuning)."""
    B, T, H, V = v.shape
    M = logits.shape[-1]
    v, logits, eta, mu, h0, ht, N = _prepare(v, logits, eta, mu, initial_state, output_final_state, cu_seqlens)
    lse = logsumexp(logits)

    BM = min(triton.next_power_of_2(M), MAX_BLOCK_M)
    # best measured on an H100 (benchmarks/ops/sweep_launch_configs.py): one program per 64 value
    # columns, 8 warps, no software pipelining of the walk
    BV = block_v or min(triton.next_power_of_2(V), 64)
    NM, NV = triton.cdiv(M, BM), triton.cdiv(V, BV)
    if NM == 1:
        o = torch.empty_like(v)
    else:
        o = torch.empty(NM, B, T, H, V, dtype=torch.float32, device=v.device)
    precision = "ieee" if v.dtype == torch.float32 else "tf32"
    chunk_fwd_kernel[(NV, NM, N * H)](
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
        B * T * H * V,
        H=H,
        M=M,
        V=V,
        BT=SUB_CHUNK,
        BM=BM,
        BV=BV,
        DOT_PRECISION=precision,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if NM > 1:
        o = o.sum(0).to(v.dtype)
    return o, ht


def fused_recurrent_fwd(
    v: torch.Tensor,
    logits: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    block_v: int | None = None,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dense token-by-token forward for decoding; no autograd. Shapes as in the public op.
    ``block_v`` and ``num_warps`` override the launch configuration (for tuning)."""
    B, T, H, V = v.shape
    M = logits.shape[-1]
    v, logits, eta, mu, h0, ht, N = _prepare(v, logits, eta, mu, initial_state, output_final_state, cu_seqlens)
    o = torch.empty_like(v)
    BM = triton.next_power_of_2(M)
    BV = block_v or min(triton.next_power_of_2(V), 32)  # best measured on an H100 at M = 64 and 256
    fused_recurrent_fwd_kernel[(triton.cdiv(V, BV), N * H)](
        v, logits, eta, mu, h0, o, ht, cu_seqlens, T, H=H, M=M, V=V, BM=BM, BV=BV, num_warps=num_warps
    )
    return o, ht
