"""Routing diagnostics of the Factorization Memory layer and its optional load-balancing loss.

The failure signatures of SPEC section 5 are routing collapse, to near-uniform affinities (no
state specialises) or to a few states (most of the memory unused). These show them:

- ``entropy``: mean entropy of the affinity ``softmax(logits)`` over the M states, divided by
  ``log M``: 1 is uniform routing, 0 one-hot.
- ``states_used``: the effective fraction of states in use, ``exp(H(load)) / M`` of the load
  below: 1 when every state takes the same share, 1/M when one state takes everything.
- ``load``: ``[H, M]``, the share of the routing weight each state received (the top-K
  re-normalised weights in the sparse variant); each head's row sums to 1.
- ``max_load``: the largest load times M, averaged over heads (1 is perfectly balanced).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from fla_factmem.ops.factorization_memory.routing import top_rows

STAT_NAMES = ("entropy", "states_used", "max_load")


def applied_weights(alpha: torch.Tensor, topk: int | None) -> torch.Tensor:
    """The weights the memory applies: ``alpha`` ``[N, H, M]`` itself when dense, else its top-K
    re-normalised and zeros elsewhere."""
    if topk is None or topk >= alpha.shape[-1]:
        return alpha
    values, rows = top_rows(alpha, topk)
    return torch.zeros_like(alpha).scatter_(-1, rows, values / values.sum(-1, keepdim=True))


def affinity(logits: torch.Tensor) -> torch.Tensor:
    """``softmax(logits)`` in float32 with the tokens flattened: ``[..., H, M]`` to ``[N, H, M]``."""
    return logits.flatten(0, -3).float().softmax(-1)


def routing_statistics(alpha: torch.Tensor, topk: int | None = None) -> dict[str, torch.Tensor]:
    """The diagnostics of the module docstring for one batch of routing affinities.

    Args:
        alpha: ``[N, H, M]``, ``affinity(logits)`` of the real tokens.
        topk: K of the sparse variant, or None for dense.

    Returns:
        ``{"entropy": [], "states_used": [], "max_load": [], "load": [H, M]}``, float32 tensors
        detached from the graph, still on the device (no host sync).
    """
    num_memories = alpha.shape[-1]
    alpha = alpha.detach()
    entropy = -torch.special.xlogy(alpha, alpha).sum(-1).mean()
    load = applied_weights(alpha, topk).mean(0)
    effective = torch.exp(-torch.special.xlogy(load, load).sum(-1))
    return {
        "entropy": entropy / math.log(num_memories) if num_memories > 1 else entropy,
        "states_used": (effective / num_memories).mean(),
        "max_load": (load.amax(-1) * num_memories).mean(),
        "load": load,
    }


def load_balance_loss(alpha: torch.Tensor, topk: int) -> torch.Tensor:
    """Switch-Transformer balancing loss for the sparse routing, ``M * sum_m f_m P_m`` averaged
    over heads: ``f_m`` is the fraction of the top-K picks that went to state m (no gradient),
    ``P_m`` the mean affinity of state m. It is 1 when the picks are spread evenly and up to M
    when every token picks the same states.

    Args:
        alpha: ``[N, H, M]``, ``affinity(logits)``.
        topk: K.

    Returns:
        a float32 scalar that carries the gradient to ``alpha``.
    """
    num_memories = alpha.shape[-1]
    rows = top_rows(alpha.detach(), topk)[1]
    picked = torch.zeros_like(alpha).scatter_(-1, rows, 1.0).mean(0) / topk
    return num_memories * (picked * alpha.mean(0)).sum(-1).mean()


class AttachAuxiliaryLoss(torch.autograd.Function):
    """Returns ``output`` unchanged and, in the backward, gives ``aux_loss`` the gradient 1, so
    that any loss computed from ``output`` is trained as if ``aux_loss`` had been added to it
    (the pattern of DeepSeek-MoE's modeling code). This keeps the loss inside the layer, so the
    layer trains the same in any stack, without a change to the model's loss."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor) -> torch.Tensor:
        ctx.aux_dtype, ctx.aux_device = aux_loss.dtype, aux_loss.device
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, torch.ones((), dtype=ctx.aux_dtype, device=ctx.aux_device)


def routing_summary(model: nn.Module) -> dict[str, float]:
    """The diagnostics of the last forward, averaged over the model's Factorization Memory layers
    that track them (``track_routing=True``), as Python floats; one host sync. Also
    ``load_balance_loss`` when the layers computed it. Empty if no layer tracked anything."""
    stats = [m.routing_stats for m in model.modules() if getattr(m, "routing_stats", None)]
    if not stats:
        return {}
    names = [name for name in (*STAT_NAMES, "load_balance_loss") if all(name in s for s in stats)]
    values = torch.stack([torch.stack([s[name].float() for s in stats]).mean() for name in names]).tolist()
    return dict(zip(names, values))
