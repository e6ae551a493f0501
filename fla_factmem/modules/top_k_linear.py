"""The top K of a linear map's outputs per head, made a slice of tokens at a time.

The sparse layer's routing logits ``x W^T / temperature`` are ``[tokens, H, M]``; of them the
memory op needs only each token's top K and their values (``topk_indices``). Made whole, they and
their gradient take ``tokens * H * M`` elements each (4 GB each in bf16 at M = 4096, H = 8 and
65536 tokens). Here the forward makes them for one slice of tokens at a time and keeps the picks,
and the backward scatters each slice's gradient on the picks into that slice's logits for the two
GEMMs: the same arithmetic, in at most ``slice_tokens * H * M`` elements at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fla_factmem.ops.factorization_memory.launch import sparse_routing
from fla_factmem.ops.factorization_memory.routing import has_float64, top_rows
from fla_factmem.utils import is_positive_int


def top_k_rows(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """``[T, H, topk]`` int64 rows of the largest of ``logits`` ``[T, H, M]``, ties to the lower
    row: the memory op's own rule (its routing kernel on CUDA, a stable sort elsewhere)."""
    if logits.is_cuda and not has_float64(logits):
        return sparse_routing(logits.unsqueeze(0), topk).rows[0].long()
    return top_rows(logits, topk)[1]


class TopKLinearFunction(torch.autograd.Function):
    """``top_k_linear`` with its backward. Saves x, the weight and the picks."""

    @staticmethod
    def forward(ctx, x, weight, num_heads, topk, temperature, slice_tokens):
        x_rows = x.reshape(-1, x.shape[-1])
        M = weight.shape[0] // num_heads
        values, rows = [], []
        # one slice at least, so that no tokens give empty picks
        for start in range(0, max(x_rows.shape[0], 1), slice_tokens):
            logits = F.linear(x_rows[start : start + slice_tokens], weight).view(-1, num_heads, M)
            if temperature != 1:  # as the layer divides whole logits: the same roundings, the same picks
                logits = logits / temperature
            picks = top_k_rows(logits, topk)
            rows.append(picks)
            values.append(logits.gather(-1, picks))
        rows = torch.cat(rows)
        ctx.save_for_backward(x, weight, rows)
        ctx.temperature, ctx.slice_tokens = temperature, slice_tokens
        shape = (*x.shape[:-1], num_heads, topk)
        picked_rows = rows.view(shape)
        ctx.mark_non_differentiable(picked_rows)
        return torch.cat(values).view(shape), picked_rows

    @staticmethod
    @once_differentiable
    def backward(ctx, dvalues, _):
        x, weight, rows = ctx.saved_tensors
        # autocast may have made the values (and so their gradient) narrower than x and weight
        dtype = dvalues.dtype
        x_rows = x.reshape(-1, x.shape[-1]).to(dtype)
        w = weight.to(dtype)
        grads = dvalues.reshape(rows.shape)
        if ctx.temperature != 1:
            grads = grads / ctx.temperature
        dx = torch.empty_like(x_rows) if ctx.needs_input_grad[0] else None
        # the sum over slices in float32 at least: each slice's GEMM rounds once, as the whole one would
        acc_dtype = torch.promote_types(dtype, torch.float32)
        dweight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, x_rows.shape[0], ctx.slice_tokens):
            end = start + ctx.slice_tokens
            dlogits = grads.new_zeros(*rows[start:end].shape[:-1], weight.shape[0] // rows.shape[1])
            dlogits = dlogits.scatter_(-1, rows[start:end], grads[start:end]).flatten(1)
            if dx is not None:
                torch.mm(dlogits, w, out=dx[start:end])
            if dweight is not None:
                dweight += torch.mm(dlogits.t(), x_rows[start:end])
        dx = None if dx is None else dx.view(x.shape).to(x.dtype)
        return dx, None if dweight is None else dweight.to(weight.dtype), None, None, None, None


@torch.compiler.disable
def top_k_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    num_heads: int,
    topk: int,
    temperature: float = 1.0,
    slice_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top ``topk`` of ``x weight^T / temperature`` per head, with autograd to x and
    weight through the picked values (the choice of rows has none), never all logits at once.

    Args:
        x: ``[..., D]``.
        weight: ``[H * M, D]``, head h's M rows at ``h * M``.
        num_heads: H.
        topk: K in [1, M]; among equal logits the lower rows, as in the memory op.
        temperature: the logits are divided by it (before the picks, as the layer does).
        slice_tokens: tokens whose ``[H, M]`` logits are made at once; by default as many as fit
            in 2^28 logits (512 MB in bf16), at least one.

    Returns:
        ``(values, rows)``, each ``[..., H, K]``: the picks' logits (x's dtype, or autocast's) and
        their rows (int64), the ``logits`` and ``topk_indices`` of ``chunk_factorization_memory``.
    """
    for name, value in (
        ("num_heads", num_heads),
        ("topk", topk),
        ("slice_tokens", 1 if slice_tokens is None else slice_tokens),
    ):
        if not is_positive_int(value):
            raise ValueError(f"top_k_linear: {name} must be a positive int; got {value!r}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] % num_heads != 0:
        raise ValueError(f"top_k_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, num_heads {num_heads}")
    M = weight.shape[0] // num_heads
    if topk > M:
        raise ValueError(f"top_k_linear: topk must be in [1, M = {M}]; got {topk}")
    if slice_tokens is None:
        slice_tokens = max(1, 2**28 // weight.shape[0])
    return TopKLinearFunction.apply(x, weight, num_heads, topk, temperature, slice_tokens)
