"""Routing weights of Factorization Memory (SPEC section 2, steps 1 and 2), in PyTorch."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from fla_factmem.utils import host_offsets

DENSE_TRITON_MAX_M = 256  # the decode kernel holds all M rows of a state block; the backward's softmax whole rows


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: the precision of accumulation and states."""
    return torch.float64 if has_float64(*tensors) else torch.float32


def affinity(logits: torch.Tensor, topk: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The affinity alpha of every token over the M memory states.

    Args:
        logits: ``[..., M]`` routing logits.
        topk: ``None`` (or M) for the dense softmax; K < M re-normalises the softmax over
            the K largest logits of each token and gives the other states weight 0. The
            choice of states carries no gradient; the weights of the chosen ones do.
        dtype: precision of the result.

    Returns:
        ``[..., M]`` weights that sum to one over the last dim.
    """
    logits = logits.to(dtype)
    M = logits.shape[-1]
    if topk is None or topk == M:
        return logits.softmax(-1)
    top, idx = top_rows(logits, topk)
    return torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))


def top_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of ``scores`` ``[..., M]`` along the last dim, largest first, equal
    scores to the lower row: the rule of the Triton routing kernels. ``torch.topk`` breaks ties
    where its algorithm lands, differently by M and by device, and ties are common in bf16
    logits (about one token in ten at M = 256, K = 16), so it would pick other rows than the
    GPU's kernels.

    Returns:
        ``(values, rows)``, each ``[..., k]``; ``values`` carries the gradient to ``scores``.
    """
    rows = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return scores.gather(-1, rows), rows


def update_and_merge_weights(
    logits: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    topk: int | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """theta = eta * alpha and phi = mu * alpha.

    Args:
        logits: ``[B, T, H, M]``.
        eta, mu: ``[B, T, H]``.

    Returns:
        ``(theta, phi)``, each ``[B, T, H, M]`` in ``dtype``.
    """
    alpha = affinity(logits, topk, dtype)
    return eta.to(dtype)[..., None] * alpha, mu.to(dtype)[..., None] * alpha


class SparseRouting(NamedTuple):
    """Each token's top-K picks, ``[B, T, H, K]`` each: the rows (int, distinct per token) and
    their alpha (float32, the softmax re-normalised over the picks)."""

    rows: torch.Tensor
    alpha: torch.Tensor


def given_picks_routing(logits: torch.Tensor, rows: torch.Tensor) -> SparseRouting:
    """The routing of picks the caller made (``topk_indices``): ``rows`` ``[B, T, H, K]`` and their
    ``logits`` ``[B, T, H, K]`` -> rows as int32 and alpha, the softmax over the picks, in float32."""
    return SparseRouting(rows.to(torch.int32).contiguous(), logits.float().softmax(-1))


def picks_as_dense_logits(logits: torch.Tensor, rows: torch.Tensor, M: int) -> torch.Tensor:
    """The picks' ``logits`` ``[..., K]`` at their ``rows`` in ``[..., M]`` logits that are -inf
    elsewhere: the top K of those are the picks, so the operator on them is the operator on the
    picks (SPEC section 2), and the gradient comes back to ``logits`` through the scatter. For the
    PyTorch paths and decoding; it costs M per token."""
    dense = logits.new_full((*logits.shape[:-1], M), float("-inf"))
    return dense.scatter(-1, rows.long(), logits)


def sequence_spans(B: int, T: int, offsets: list[int] | None) -> list[tuple[int, int, int]]:
    """``(batch index, start, end)`` of every sequence: one per batch row, or one per packed sequence."""
    if offsets is None:
        return [(b, 0, T) for b in range(B)]
    return [(0, bos, eos) for bos, eos in zip(offsets[:-1], offsets[1:])]


def run_on_weights(
    impl: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    v: torch.Tensor,
    logits: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    topk: int | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    **impl_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Runs a PyTorch implementation ``impl(v, theta, phi, initial_state, offsets, **impl_kwargs)``
    in the compute dtype and returns ``(o in v's dtype, final state or None)``."""
    offsets = host_offsets(cu_seqlens, v.shape[1])
    dtype = compute_dtype(v, logits, eta, mu, initial_state)
    theta, phi = update_and_merge_weights(logits, eta, mu, topk, dtype)
    o, final_state = impl(v.to(dtype), theta, phi, initial_state, offsets, **impl_kwargs)
    return o.to(v.dtype), final_state if output_final_state else None


def has_float64(*tensors: torch.Tensor | None) -> bool:
    """Whether any of these tensors is float64 (no Triton kernel takes it)."""
    # a loop, not any() over a generator: decode steps call it, and it is half the cost there
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return True
    return False


def runs_dense_triton(v: torch.Tensor, logits: torch.Tensor, topk: int | None, *others: torch.Tensor | None) -> bool:
    """Whether the dense Triton kernels take this call: CUDA tensors, dense routing (topk None
    or M), M <= DENSE_TRITON_MAX_M and no float64 input."""
    M = logits.shape[-1]
    return v.is_cuda and (topk is None or topk == M) and M <= DENSE_TRITON_MAX_M and not has_float64(v, logits, *others)


def runs_sparse_triton(v: torch.Tensor, logits: torch.Tensor, topk: int | None, *others: torch.Tensor | None) -> bool:
    """Whether the sparse Triton kernels take this call: CUDA tensors, topk < M, no float64 input."""
    return v.is_cuda and topk is not None and topk < logits.shape[-1] and not has_float64(v, logits, *others)


def slow_path_reason(v: torch.Tensor, logits: torch.Tensor, topk: int | None, *others: torch.Tensor | None) -> str:
    """Why a CUDA call fell to a PyTorch path, for the one-time warning; ``others`` are the
    remaining tensor inputs. Sparse calls reach it only with float64."""
    if has_float64(v, logits, *others):
        return "float64 inputs have no Triton kernel"
    return f"M = {logits.shape[-1]} > {DENSE_TRITON_MAX_M} has no dense Triton kernel"
