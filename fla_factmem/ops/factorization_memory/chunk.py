"""``chunk_factorization_memory``: the chunked, differentiable op for training and prefill."""

from __future__ import annotations

import torch

from fla_factmem.ops.factorization_memory.chunk_torch import DEFAULT_CHUNK_SIZE, chunk_factorization_memory_torch
from fla_factmem.ops.factorization_memory.launch import (
    SavedForBackward,
    SparseEvents,
    chunk_bwd,
    chunk_fwd,
    chunk_sparse_bwd,
    chunk_sparse_fwd,
    sparse_routing,
)
from fla_factmem.ops.factorization_memory.routing import (
    given_picks_routing,
    has_float64,
    picks_as_dense_logits,
    run_on_weights,
    runs_dense_triton,
    runs_sparse_triton,
    slow_path_reason,
)
from fla_factmem.ops.factorization_memory.validation import check_chunk_size, validate_inputs
from fla_factmem.utils import needs_autograd, on_device_of, warn_once


class ChunkFactorizationMemoryFunction(torch.autograd.Function):
    """Dense op on CUDA: Triton kernels both ways, each with v's GPU current (``on_device_of``;
    autograd's own device threads would see to the backward, compiled autograd would not). Saves
    the inputs, the per-token log-sum-exp and dominant row, the memory at each chunk's start
    ([NT_total, H, M, V], bf16 for bf16 inputs, else float32) and the intra-chunk scores
    ([B, T, H, 32] float32). ``store_for_backward`` False (no backward will run, as in a prefill
    under no_grad) skips the scores."""

    @staticmethod
    def forward(ctx, v, logits, eta, mu, initial_state, output_final_state, cu_seqlens, store_for_backward=True):
        with on_device_of(v):
            o, final_state, saved = chunk_fwd(
                v, logits, eta, mu, initial_state, output_final_state, cu_seqlens, store_for_backward
            )
        ctx.save_for_backward(v, logits, eta, mu, cu_seqlens, saved.lse, saved.dominant, saved.states, saved.scores)
        ctx.layout = saved.layout
        ctx.needs_dh0 = initial_state is not None
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        v, logits, eta, mu, cu_seqlens, lse, dominant, states, scores = ctx.saved_tensors
        saved = SavedForBackward(lse, dominant, states, scores, ctx.layout)
        with on_device_of(v):
            dv, dlogits, deta, dmu, dh0 = chunk_bwd(v, logits, eta, mu, saved, do, dht, cu_seqlens, ctx.needs_dh0)
        return dv, dlogits, deta, dmu, dh0, None, None, None


class ChunkSparseFactorizationMemoryFunction(torch.autograd.Function):
    """Sparse (top-K) op on CUDA: Triton kernels both ways (with v's GPU current, as in the dense
    op), along the rows each token picks.
    The picks are the top K of the ``[B, T, H, M]`` logits, or ``topk_indices`` where the caller
    made them (then ``logits`` holds their ``[B, T, H, K]`` logits and gets a gradient of that shape).
    Saves v, eta, mu, the initial state and ``SparseEvents``: the picks ``[B, T, H, K]`` and,
    sorted along the memory's rows, their keys, flat indices, theta and phi (``[H, B T K]``
    each), about 24 bytes per pick; and the memory entering each tile of ``SPARSE_TILE`` (8)
    consecutive events of a head (``[H, B T K / 8, V]`` float32). Not the logits: their
    gradient needs only the picks. ``store_for_backward`` False (no backward will run) skips
    the carries."""

    @staticmethod
    def forward(
        ctx,
        v,
        logits,
        eta,
        mu,
        topk,
        topk_indices,
        M,
        initial_state,
        output_final_state,
        cu_seqlens,
        store_for_backward=True,
    ):
        with on_device_of(v):
            if topk_indices is None:
                routing = sparse_routing(logits, topk)
            else:
                routing = given_picks_routing(logits, topk_indices)
            o, final_state, events, carries = chunk_sparse_fwd(
                v, eta, mu, routing, M, initial_state, output_final_state, cu_seqlens, store_for_backward
            )
        ctx.save_for_backward(v, eta, mu, initial_state, cu_seqlens, carries, *events)
        ctx.M, ctx.logits_dtype, ctx.picks_only = M, logits.dtype, topk_indices is not None
        ctx.needs_dh0 = initial_state is not None
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        v, eta, mu, initial_state, cu_seqlens, carries, *events = ctx.saved_tensors
        events = SparseEvents(*events)
        with on_device_of(v):
            dv, dlogits, deta, dmu, dh0 = chunk_sparse_bwd(
                v, eta, mu, ctx.M, ctx.logits_dtype, events, carries, initial_state, do, dht, cu_seqlens, ctx.needs_dh0,
                ctx.picks_only,
            )  # fmt: skip
        return dv, dlogits, deta, dmu, None, None, None, dh0, None, None, None


@torch.compiler.disable
def chunk_factorization_memory(
    v: torch.Tensor,
    logits: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    topk: int | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk_size: int | None = None,
    topk_indices: torch.Tensor | None = None,
    num_memories: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Factorization Memory in chunked form (SPEC section 2), differentiable in every input.

    Each token routes itself over the M memory states with
    :math:`\alpha_t = \mathrm{softmax}(\mathrm{logits}_t)` (re-normalised over its top-``topk``
    logits in the sparse variant), writes :math:`h_t[j] = (1 - \eta_t\alpha_t[j]) h_{t-1}[j]
    + \eta_t\alpha_t[j] v_t` and reads :math:`o_t = \sum_j \mu_t\alpha_t[j] h_t[j]`.

    On CUDA, dense calls (``topk`` None or M, M <= 256) run the Triton kernels, forward and
    backward, which derive the routing weights and decays on chip; for the backward they keep the
    memory at every chunk's start (``[T/32 * B, H, M, V]``, bf16 for bf16 inputs, else float32) and
    the intra-chunk scores (``[B, T, H, 32]`` float32), never q, k or the decays. Sparse calls
    (``topk`` < M, any M) run the sparse Triton kernels, forward and backward: each token's K picks,
    sorted by row, become scans along each row's picks, which read and write only the rows some
    token picks; for the backward they keep the sorted picks (``[H, B T K]``, T * K values per head)
    and the memory entering every tile of 8 sorted picks (``[H, B T K / 8, V]`` float32), not the
    logits, and while they run they hold the picks' terms of o or dv (``[B T, H, K, V]`` in v's
    dtype). Other calls (dense M > 256, float64), and every call on the CPU, run the PyTorch chunked
    path (on CUDA it warns once).

    Args:
        v: ``[B, T, H, V]`` values written into the memory.
        logits: ``[B, T, H, M]`` routing logits (already divided by the temperature).
        eta: ``[B, T, H]`` update rates in [0, 1].
        mu: ``[B, T, H]`` merge rates in [0, 1].
        topk: ``None`` for dense routing, or K in [1, M] for the sparse variant (K = M is dense;
            among equal logits the lower rows are picked, on every device).
        initial_state: ``[N, H, M, V]`` memory before the first token; zeros if None.
            Gradients flow into it.
        output_final_state: whether to return the memory after the last token.
        cu_seqlens: ``[N + 1]`` int offsets of sequences packed along T (then B must be 1).
            Its values are checked on the PyTorch path only: the sparse kernels never read them
            on the host, so a check would add a sync (the dense kernels read the lengths once,
            in FLA's ``prepare_chunk_indices``, cached per tensor object: as with FLA's own
            chunk ops, offsets refilled in place into the same tensor reuse the old layout, so
            give each batch a tensor of its own).
        chunk_size: tokens per chunk of the PyTorch path (default 16; its memory grows with
            T * chunk_size * M); the dense Triton kernels use chunks of 32 and the sparse
            ones none; both ignore it.
        topk_indices: ``[B, T, H, K]`` int32 or int64, each token's picks when the caller made
            them (say, top-K over logits it computed in slices, so that ``[B, T, H, M]`` logits
            never exist): K distinct rows in ``[0, num_memories)`` per token, unchecked (a check
            would sync the GPU). Then ``logits`` is ``[B, T, H, K]``, the picks' logits, whose
            softmax gives alpha, and their gradient has that shape; ``topk`` may be left None.
            The op is the one on ``[B, T, H, M]`` logits that are -inf outside the picks. On CUDA
            the sparse kernels run, and no part of the op, forward or backward, is of size M.
        num_memories: M, with ``topk_indices`` only.

    Returns:
        ``o`` ``[B, T, H, V]`` in the dtype of ``v``, and the final state ``[N, H, M, V]``
        in float32 (float64 for float64 inputs) if ``output_final_state`` else None.
        Inputs may be float32, bfloat16 or float16; accumulation is in float32.
    """
    M = validate_inputs(v, logits, eta, mu, topk, initial_state, cu_seqlens, topk_indices, num_memories).M
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()  # the kernels index it as a flat array
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    check_chunk_size(chunk_size)
    # with no backward to come (no_grad, or no input that requires grad) the kernels store less
    store_for_backward = needs_autograd(v, logits, eta, mu, initial_state)
    if topk_indices is not None:
        if v.is_cuda and not has_float64(v, logits, eta, mu, initial_state):
            return ChunkSparseFactorizationMemoryFunction.apply(
                v, logits, eta, mu, None, topk_indices, M, initial_state, output_final_state, cu_seqlens,
                store_for_backward,
            )  # fmt: skip
        logits, topk = picks_as_dense_logits(logits, topk_indices, M), logits.shape[-1]
    if runs_dense_triton(v, logits, topk, eta, mu, initial_state):
        return ChunkFactorizationMemoryFunction.apply(
            v, logits, eta, mu, initial_state, output_final_state, cu_seqlens, store_for_backward
        )
    if runs_sparse_triton(v, logits, topk, eta, mu, initial_state):
        return ChunkSparseFactorizationMemoryFunction.apply(
            v, logits, eta, mu, topk, None, M, initial_state, output_final_state, cu_seqlens, store_for_backward
        )
    if v.is_cuda:
        warn_once(
            "chunk_torch_on_cuda",
            f"fla_factmem: chunk_factorization_memory runs the PyTorch chunked path on the GPU because "
            f"{slow_path_reason(v, logits, topk, eta, mu, initial_state)}; it is slow and memory-hungry there.",
        )
    return run_on_weights(
        chunk_factorization_memory_torch,
        v,
        logits,
        eta,
        mu,
        topk,
        initial_state,
        output_final_state,
        cu_seqlens,
        chunk_size=chunk_size,
    )
