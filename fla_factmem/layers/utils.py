"""Input checks shared by the layers."""

from __future__ import annotations

import torch


def check_padding_mask(attention_mask: torch.Tensor | None, batch_size: int, min_len: int = 0) -> None:
    """Layers take a ``[B, S]`` 0/1 padding mask, as FLA's do; arbitrary attention masks are refused,
    and so are masks of another batch size or of fewer than ``min_len`` positions (FLA's unpadding
    would index the wrong tokens with them, silently)."""
    if attention_mask is None:
        return
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be a [batch_size, seq_len] 0/1 padding mask; got shape {tuple(attention_mask.shape)}"
        )
    if attention_mask.shape[0] != batch_size or attention_mask.shape[1] < min_len:
        span = f"at least {min_len} positions" if min_len else "any number of positions"
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not fit the input: it needs "
            f"{batch_size} rows and {span} (the last ones are this call's tokens)"
        )


def check_cached_batch(cached_batch: int, batch_size: int, layer: str) -> None:
    """A cache holds one entry per sequence of the call that filled it; a later call must bring as many."""
    if cached_batch != batch_size:
        raise ValueError(
            f"{layer}: the cache holds {cached_batch} sequences but this call has {batch_size}; continue a "
            "cache with the same batch (or the same number of packed sequences)"
        )
