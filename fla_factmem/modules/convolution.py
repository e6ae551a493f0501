"""FLA's short causal convolution with a PyTorch path for CPU tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.modules import ShortConvolution as FLAShortConvolution

from fla_factmem.utils import host_offsets


class ShortConvolution(FLAShortConvolution):
    """Depthwise causal convolution over time with an optional SiLU, and FLA's cache layout.

    Args of ``forward``:
        x: ``[B, T, D]`` (B = 1 with ``cu_seqlens``).
        residual: optional ``[B, T, D]`` added to the output.
        mask: optional ``[B, T]`` 0/1 padding mask; padded inputs count as zeros.
        cache: optional ``[N, D, W]``: the last W inputs of every sequence (newest last).
        output_final_state: whether to return the updated cache.
        cu_seqlens: optional ``[N + 1]`` offsets of sequences packed along T.

    Returns:
        ``y`` ``[B, T, D]`` and the cache ``[N, D, W]`` (None unless ``output_final_state``).
    """

    def forward(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **kwargs):
        if x.is_cuda:
            return super().forward(x, residual, mask, cache, output_final_state, cu_seqlens, **kwargs)
        return self.forward_torch(x, residual, mask, cache, output_final_state, cu_seqlens)

    def forward_torch(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None):
        if mask is not None:
            if cu_seqlens is not None:
                raise ValueError("`mask` and `cu_seqlens` cannot be provided at the same time")
            x = x * mask[..., None].to(x.dtype)
        if cu_seqlens is None:
            y, final_state = self._convolve(x, cache)
        else:
            offsets = host_offsets(cu_seqlens, x.shape[1])
            pieces = [
                self._convolve(x[:, bos:eos], None if cache is None else cache[i : i + 1])
                for i, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:]))
            ]
            y = torch.cat([p[0] for p in pieces], dim=1)
            final_state = torch.cat([p[1] for p in pieces], dim=0)
        if residual is not None:
            y = y + residual
        return y, final_state if output_final_state else None

    def _convolve(self, x: torch.Tensor, cache: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch of equal-length sequences: ``x`` [B, T, D], ``cache`` [B, D, W] or None."""
        B, T, D = x.shape
        W = self.kernel_size[0]
        past = x.new_zeros(B, D, W) if cache is None else cache.to(x.dtype)
        window = torch.cat([past, x.transpose(1, 2)], dim=-1)  # [B, D, W + T]
        if T == 0:  # an empty sequence (a packed one, or a fully padded row): the cache as it was
            return x.new_empty(B, 0, D), window.contiguous()
        bias = None if self.bias is None else self.bias.float()
        # the first input column only ever feeds the cache: the convolution sees the last W - 1 past inputs
        y = F.conv1d(window[..., 1:].float(), self.weight.float(), bias, groups=D)
        if self.activation is not None:
            y = F.silu(y)
        return y.transpose(1, 2).to(x.dtype), window[..., -W:].contiguous()
