"""Several linear maps of one input by the row blocks of one weight, with one gradient on the input.

The layer makes v, z, the routing logits and the rates from ``x`` with one GEMM per block of
``in_proj``'s rows. Through ``F.linear`` on each block, autograd would sum the blocks' gradients
on ``x`` with an add kernel per extra block, each reading two ``[B T, D]`` tensors and writing
one. Here the backward accumulates them in cuBLAS's epilogue (``addmm_``), which reads the sum
so far and writes it once per block, and writes the blocks' weight gradients straight into one
gradient for the whole weight."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class SplitLinearFunction(torch.autograd.Function):
    """``split_linear`` with its backward."""

    @staticmethod
    def forward(ctx, x, weight, split_sizes, skip):
        ctx.save_for_backward(x, weight)
        ctx.split_sizes = split_sizes
        return tuple(None if i in skip else F.linear(x, block) for i, block in enumerate(weight.split(split_sizes)))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        x_rows = x.reshape(-1, x.shape[-1])
        # autocast may have made the outputs (and so the gradients) narrower than x and weight
        dtype = next((g.dtype for g in grads if g is not None), x.dtype)
        blocks = weight.to(dtype).split(ctx.split_sizes)
        g_rows = [None if g is None else g.reshape(-1, g.shape[-1]) for g in grads]
        dx = dweight = None
        if ctx.needs_input_grad[0]:
            # the widest block first: a plain GEMM writes the sum, the others add to it
            order = sorted((i for i, g in enumerate(g_rows) if g is not None), key=lambda i: -ctx.split_sizes[i])
            if order:
                dx = torch.mm(g_rows[order[0]], blocks[order[0]])
                for i in order[1:]:
                    dx.addmm_(g_rows[i], blocks[i])
                dx = dx.view(x.shape).to(x.dtype)
            else:
                dx = torch.zeros_like(x)
        if ctx.needs_input_grad[1]:
            dweight = torch.empty(weight.shape, dtype=dtype, device=weight.device)
            x_cast = x_rows.to(dtype)
            for g, rows in zip(g_rows, dweight.split(ctx.split_sizes)):
                if g is None:
                    rows.zero_()
                else:
                    torch.mm(g.t(), x_cast, out=rows)
            dweight = dweight.to(weight.dtype)
        return dx, dweight, None, None


def split_linear(
    x: torch.Tensor, weight: torch.Tensor, split_sizes: Sequence[int], skip: Sequence[int] = ()
) -> tuple[torch.Tensor | None, ...]:
    """``F.linear(x, block)`` for each block of ``weight``'s rows, with autograd.

    Args:
        x: ``[..., D]``.
        weight: ``[sum(split_sizes), D]``.
        split_sizes: the blocks' row counts, in order.
        skip: indices of blocks not computed (None in their place; their rows of the weight's
            gradient are 0 here, for whoever uses them otherwise to add to).

    Returns:
        one ``[..., split_sizes[i]]`` tensor per block, each contiguous. The backward adds the
        blocks' gradients on ``x`` in the GEMMs' epilogues (no add kernels) and writes the weight's
        gradient as one tensor.
    """
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or sum(split_sizes) != weight.shape[0]:
        raise ValueError(f"split_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, blocks {list(split_sizes)}")
    return SplitLinearFunction.apply(x, weight, tuple(split_sizes), frozenset(skip))
