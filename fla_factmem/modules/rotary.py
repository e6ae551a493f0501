"""Rotary position embedding in PyTorch, at explicit positions."""

from __future__ import annotations

import torch
import torch.nn as nn


class RotaryEmbedding(nn.Module):
    """RoPE with FLA's convention (non-interleaved halves, ``inv_freq = base^(-2i/dim)``).

    Positions are given per token, which covers caches, left padding and packed sequences
    alike. ``forward(q, k, positions)``: q ``[B, T, Hq, D]``, k ``[B, T, Hk, D]``,
    positions ``[B, T]`` or ``[T]`` integers; returns the rotated ``(q, k)``.
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = dim, base
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))

    def reset_parameters(self) -> None:
        # FLA's weight init calls this on every module that has it; the buffer is not a checkpoint entry
        with torch.no_grad():
            self.inv_freq.copy_(self._inv_freq().to(self.inv_freq.device))

    def _apply(self, fn, *args, **kwargs):
        # a cast of the model (.to(torch.bfloat16), .half()) would round the frequencies, and with
        # them every angle (1.75 rad off at position 4000 in bf16): they stay float32, on the
        # device the cast names (FLA's RotaryEmbedding recomputes them in float32 too)
        super()._apply(fn, *args, **kwargs)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._inv_freq().to(self.inv_freq.device)
        return self

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq
        if freqs.dim() == 2:
            freqs = freqs[None]
        cos, sin = freqs.cos()[:, :, None], freqs.sin()[:, :, None]  # [B, T, 1, D / 2]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
