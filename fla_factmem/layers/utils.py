"""Input checks shared by the layers."""

from __future__ import annotations

import torch


def check_padding_mask(attention_mask: torch.Tensor | None) -> None:
    """Layers take a ``[B, S]`` 0/1 padding mask, as FLA's do; arbitrary attention masks are refused."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be a [batch_size, seq_len] 0/1 padding mask; got shape {tuple(attention_mask.shape)}"
        )
