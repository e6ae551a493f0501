"""RMS norms of FLA with a PyTorch path for CPU tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.modules import FusedRMSNormGated as FLAFusedRMSNormGated
from fla.modules import RMSNorm as FLARMSNorm


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim, computed in float32; returns float32."""
    x = x.float()
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.float()


class RMSNorm(FLARMSNorm):
    """FLA's ``RMSNorm`` (optionally adding a residual first, ``prenorm`` returning the sum too).

    Args of ``forward``:
        x: ``[..., D]``.
        residual: optional ``[..., D]`` added to ``x`` before the norm.
        prenorm: if True, also return ``x + residual`` (the new residual stream).
        residual_in_fp32: keep that sum in float32.

    Returns:
        ``y`` ``[..., D]`` in the dtype of ``x``, or ``(y, x + residual)`` when ``prenorm``.
    """

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        if x.is_cuda:
            return super().forward(x, residual, prenorm, residual_in_fp32)
        return self.forward_torch(x, residual, prenorm, residual_in_fp32)

    def forward_torch(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        summed = x if residual is None else x + residual
        y = rms_norm_torch(summed, self.weight, self.eps)
        if self.bias is not None:
            y = y + self.bias.float()
        y = y.to(x.dtype)
        if not prenorm:
            return y
        return y, summed.float() if residual_in_fp32 else summed.to(x.dtype)


class FusedRMSNormGated(FLAFusedRMSNormGated):
    """FLA's gated RMS norm: ``rmsnorm(x) * weight * act(g)`` with act SiLU (``swish``) or sigmoid.

    Args of ``forward``:
        x, g: ``[..., D]``; the norm runs over the last dim.

    Returns:
        ``[..., D]`` in the dtype of ``x``.
    """

    def forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
        if x.is_cuda:
            return super().forward(x, g, residual, prenorm, residual_in_fp32)
        if residual is not None or prenorm:
            raise NotImplementedError("FusedRMSNormGated on the CPU takes no residual")
        return self.forward_torch(x, g)

    def forward_torch(self, x, g):
        gate = F.silu(g.float()) if self.activation in ("swish", "silu") else torch.sigmoid(g.float())
        return (rms_norm_torch(x, self.weight, self.eps) * gate).to(x.dtype)
