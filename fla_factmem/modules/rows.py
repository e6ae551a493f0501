"""Rows of a tensor where they lie, for kernels that take a row stride."""

from __future__ import annotations

import torch


def rows_at_one_stride(x: torch.Tensor) -> torch.Tensor:
    """x ``[..., C]`` as ``[rows, C]``: a view where its rows lie at one stride with unit steps
    within them (a slice of a wider projection's output), else a contiguous copy."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 or x.shape[-1] == 1 else rows.contiguous()
