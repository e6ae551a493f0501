"""``fused_recurrent_factorization_memory``: token by token, for decoding."""

from __future__ import annotations

import torch

from fla_factmem.ops.factorization_memory.launch import DecodeLaunch
from fla_factmem.ops.factorization_memory.naive import recurrent_factorization_memory_torch
from fla_factmem.ops.factorization_memory.routing import (
    picks_as_dense_logits,
    run_on_weights,
    runs_dense_triton,
    runs_sparse_triton,
    slow_path_reason,
)
from fla_factmem.ops.factorization_memory.validation import check_inplace_state, validate_inputs
from fla_factmem.utils import needs_autograd, on_device_of, warn_once

# The decode launches of the kinds of calls seen so far, by ``call_key``: an eager decode step is
# mostly host time, and the checks and launch sizes of a kind of call need working out only once
_DECODE_LAUNCHES: dict[tuple, DecodeLaunch] = {}
MAX_DECODE_LAUNCHES = 256  # a bound, should a caller cycle through many shapes


def _tensor_key(x: torch.Tensor | None) -> tuple | None:
    """One input's part of ``call_key``."""
    return None if x is None else (x.shape, x.stride(), x.dtype, x.device, x.requires_grad, x.data_ptr() % 16 == 0)


def call_key(
    v, logits, eta, mu, topk, initial_state, output_final_state, cu_seqlens, inplace_final_state
) -> tuple | None:
    """What the checks of a call and its launch depend on: the grad mode, the flags, ``topk`` and
    each tensor's shape, strides, dtype, device, ``requires_grad`` and 16-byte alignment (which
    the kernel's compilation depends on). None where the checks have more to say than a key
    holds: an input that is not a plain strided tensor, or a ``topk`` that is not an int."""
    if topk is not None and topk.__class__ is not int:  # True == 1 in a key
        return None
    tensors = (v, logits, eta, mu, initial_state, cu_seqlens)
    for x in tensors:
        if x is not None and x.__class__ is not torch.Tensor:
            return None
    try:
        tensor_keys = tuple(map(_tensor_key, tensors))
    except RuntimeError:  # a sparse tensor has no strides
        return None
    return (torch.is_grad_enabled(), topk, output_final_state, inplace_final_state, *tensor_keys)


@torch.compiler.disable
def fused_recurrent_factorization_memory(
    v: torch.Tensor,
    logits: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    topk: int | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    inplace_final_state: bool = False,
    topk_indices: torch.Tensor | None = None,
    num_memories: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Factorization Memory one token at a time, meant for decoding (T = 1 up to short prompts).

    Same arguments, semantics and results as :func:`chunk_factorization_memory`, less
    ``chunk_size``; pass the state returned by the previous call as ``initial_state`` in place
    of a cache. On CUDA, calls without autograd (sparse, or dense with M <= 256; not float64)
    run one Triton launch for all sequences and heads (given picks add their scatter into -inf
    logits; no host sync, so it can be captured in a CUDA graph); other calls run the PyTorch
    token loop, which warns once on CUDA. The sparse kernel (``topk < M``) reads the M logits of
    a token and then reads and writes only its top-K rows of the state; with
    ``inplace_final_state`` it does so in ``initial_state`` itself, so a step
    costs O(M + K * V) per head instead of a copy of the whole state.

    Args:
        v: ``[B, T, H, V]`` values written into the memory.
        logits: ``[B, T, H, M]`` routing logits (already divided by the temperature).
        eta: ``[B, T, H]`` update rates in [0, 1].
        mu: ``[B, T, H]`` merge rates in [0, 1].
        topk: ``None`` for dense routing, or K in [1, M] for the sparse variant (the K largest
            logits of each token; among equal logits the lower rows, on every device).
        initial_state: ``[N, H, M, V]`` memory before the first token; zeros if None.
        output_final_state: whether to return the memory after the last token.
        cu_seqlens: ``[N + 1]`` int offsets of sequences packed along T (then B must be 1).
        inplace_final_state: write the final state into ``initial_state`` (float32,
            contiguous, no autograd), which is then the final state returned with
            ``output_final_state``.
        topk_indices: ``[B, T, H, K]`` each token's picks, made by the caller, with ``logits``
            their ``[B, T, H, K]`` logits, as in :func:`chunk_factorization_memory`. Here they
            are scattered into ``[B, T, H, M]`` logits that are -inf elsewhere, whose top K the
            kernels pick again (M logits a token, which decoding reads anyway).
        num_memories: M, with ``topk_indices`` only.

    Returns:
        ``o`` ``[B, T, H, V]`` in the dtype of ``v``, and the final state ``[N, H, M, V]``
        in float32 (float64 for float64 inputs; ``initial_state`` itself, float32, with
        ``inplace_final_state``) if ``output_final_state`` else None.
    """
    if topk_indices is not None or num_memories is not None:
        M = validate_inputs(v, logits, eta, mu, topk, initial_state, cu_seqlens, topk_indices, num_memories).M
        logits, topk = picks_as_dense_logits(logits, topk_indices, M), logits.shape[-1]
    key = call_key(v, logits, eta, mu, topk, initial_state, output_final_state, cu_seqlens, inplace_final_state)
    decode = _DECODE_LAUNCHES.get(key)
    if decode is not None:  # a kind of call that passed the checks below and took a kernel
        with on_device_of(v):
            return decode(v, logits, eta, mu, initial_state, cu_seqlens)
    validate_inputs(v, logits, eta, mu, topk, initial_state, cu_seqlens)
    needs_grad = needs_autograd(v, logits, eta, mu, initial_state)
    if inplace_final_state:
        check_inplace_state(initial_state, needs_grad)
    if not needs_grad and (
        runs_dense_triton(v, logits, topk, eta, mu, initial_state)
        or runs_sparse_triton(v, logits, topk, eta, mu, initial_state)
    ):
        decode = DecodeLaunch(
            v, logits, eta, mu, initial_state, output_final_state, cu_seqlens, topk, inplace_final_state
        )
        with on_device_of(v):
            out = decode(v, logits, eta, mu, initial_state, cu_seqlens)
        if key is not None:  # kept once its first launch went through
            if len(_DECODE_LAUNCHES) >= MAX_DECODE_LAUNCHES:
                _DECODE_LAUNCHES.clear()
            _DECODE_LAUNCHES[key] = decode
        return out
    if v.is_cuda:
        others = (eta, mu, initial_state)
        reason = "its Triton kernel has no backward" if needs_grad else slow_path_reason(v, logits, topk, *others)
        warn_once(
            "recurrent_torch_on_cuda",
            f"fla_factmem: fused_recurrent_factorization_memory runs the PyTorch token loop on the GPU because "
            f"{reason}; it is slow there (train with chunk_factorization_memory).",
        )
    o, final_state = run_on_weights(
        recurrent_factorization_memory_torch,
        v,
        logits,
        eta,
        mu,
        topk,
        initial_state,
        output_final_state or inplace_final_state,
        cu_seqlens,
    )
    if inplace_final_state:
        # a state made under torch.inference_mode() (a prefill there) is an inference tensor, which
        # torch lets only inference mode update in place; without autograd that is safe, and the
        # Triton kernels write such a state in place too
        with torch.inference_mode(initial_state.is_inference()):
            final_state = initial_state.copy_(final_state)
    return o, final_state if output_final_state else None
