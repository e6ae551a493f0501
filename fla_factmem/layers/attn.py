"""Causal softmax attention on PyTorch SDPA, for machines without flash-attn."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from fla.ops.utils.index import prepare_position_ids

from fla_factmem.layers.utils import check_cached_batch, check_padding_mask
from fla_factmem.modules import RMSNorm, RotaryEmbedding
from fla_factmem.utils import host_offsets, warn_once


def attention_allowed(q_len: int, k_len: int, window_size: int | None, device) -> torch.Tensor:
    """``[q_len, k_len]`` bool: query i (the last q_len of k_len positions) may see key j."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window_size is not None:
        allowed &= k_pos > q_pos - window_size
    return allowed


class Attention(nn.Module):
    """Causal multi-head attention with RoPE, GQA, an optional sliding window, padding masks,
    packed sequences and FLA's cache, computed by ``torch.nn.functional.scaled_dot_product_attention``.

    Same parameters, arguments and results as ``fla.layers.attn.Attention`` (which needs
    flash-attn); the ``attention`` mixer picks FLA's layer when flash-attn is installed and
    this one otherwise, and checkpoints load into either. One difference: left padding never
    shifts RoPE positions here, where FLA's layer discounts it only when given a cache, so a
    left-padded batch without one (training, scoring) rotates its tokens by their padded index
    there: the same weights then differ on such rows.

    Args:
        hidden_size: width D of input and output; the head width is ``hidden_size // num_heads``.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA); ``num_heads`` by default.
        qkv_bias: biases on the q, k, v projections.
        qk_norm: RMS-normalise q and k per head.
        window_size: if set, each token sees itself and the ``window_size - 1`` before it.
        rope_theta: RoPE base.
        max_position_embeddings: accepted for FLA compatibility; RoPE needs no table.
        layer_idx: the layer's index in the model; needed with a cache.
    """

    def __init__(
        self,
        hidden_size: int = 2048,
        num_heads: int = 32,
        num_kv_heads: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        window_size: int | None = None,
        rope_theta: float = 10000.0,
        max_position_embeddings: int | None = None,
        layer_idx: int | None = None,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if hidden_size % num_heads != 0 or num_heads % num_kv_heads != 0:
            raise ValueError(
                f"need hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0; "
                f"got {hidden_size}, {num_heads}, {num_kv_heads}"
            )
        if window_size is not None and window_size < 1:
            raise ValueError(f"`window_size` must be None or positive; got {window_size!r}")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.kv_dim = num_kv_heads * self.head_dim
        self.qkv_bias, self.qk_norm, self.window_size = qkv_bias, qk_norm, window_size
        self.rope_theta, self.max_position_embeddings, self.layer_idx = rope_theta, max_position_embeddings, layer_idx

        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, self.kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, self.kv_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, dtype=torch.float32)
            self.k_norm = RMSNorm(self.head_dim, dtype=torch.float32)
        self.rotary = RotaryEmbedding(self.head_dim, base=rope_theta)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        output_attentions: bool = False,
        use_cache: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, None, object]:
        """
        Args:
            hidden_states: ``[B, T, hidden_size]``.
            attention_mask: optional ``[B, S]`` 0/1 padding mask over the last S tokens seen
                (S = past + T when decoding, as in ``generate``).
            past_key_values: FLA ``Cache``; keys and values go into its ``attn_state``.
            cu_seqlens (kwarg): ``[N + 1]`` offsets of packed sequences (B = 1; with a cache, N = 1 and
                the cache empty).

        Returns:
            ``(y [B, T, hidden_size], None, past_key_values)``.
        """
        batch_size, q_len, _ = hidden_states.shape
        check_padding_mask(attention_mask, batch_size)
        if hidden_states.is_cuda:
            # the attention mixer takes this layer only where flash-attn is missing
            warn_once(
                "sdpa-attention",
                "fla_factmem.layers.Attention runs attention on PyTorch SDPA: one call per packed sequence (the "
                "offsets read on the host) and a dense [T, T] mask for sliding windows and padding; FLA's "
                "Attention on flash-attn is faster (the attention mixer takes it where flash-attn is installed)",
            )
        q = rearrange(self.q_proj(hidden_states), "... (h d) -> ... h d", d=self.head_dim)
        k = rearrange(self.k_proj(hidden_states), "... (h d) -> ... h d", d=self.head_dim)
        v = rearrange(self.v_proj(hidden_states), "... (h d) -> ... h d", d=self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)

        cu_seqlens = kwargs.get("cu_seqlens")
        past_len = 0 if past_key_values is None else past_key_values.get_seq_length(self.layer_idx)
        if cu_seqlens is not None and past_len > 0:
            raise ValueError("cu_seqlens cannot be combined with a cache that already holds tokens")
        if cu_seqlens is not None and cu_seqlens.numel() > 2 and past_key_values is not None:
            # the cache keeps a [B, S] row of keys per sequence: packed ones would share one row,
            # and a later step would attend across sequences
            raise ValueError(
                "several packed sequences (cu_seqlens) cannot fill an attention layer's cache; pass "
                "use_cache=False, or prefill them as a padded batch with attention_mask"
            )
        cached = past_key_values[self.layer_idx]["attn_state"] if past_len > 0 else None
        if cached is not None:
            check_cached_batch(cached[0].shape[0], batch_size, "Attention")
        q, k = self.rotary(q, k, self._positions(batch_size, q_len, past_len, attention_mask, cu_seqlens, q.device))

        if past_key_values is not None:
            past_key_values.update(
                attn_state=(k.flatten(-2, -1), v.flatten(-2, -1)),
                layer_idx=self.layer_idx,
                offset=q_len,
                cache_kwargs=dict(window_size=self.window_size),
            )
            if cached is not None:
                k = torch.cat([rearrange(cached[0], "... (h d) -> ... h d", d=self.head_dim), k], dim=1)
                v = torch.cat([rearrange(cached[1], "... (h d) -> ... h d", d=self.head_dim), v], dim=1)

        if cu_seqlens is not None:
            offsets = host_offsets(cu_seqlens, q_len)
            o = torch.cat(
                [self._attend(q[:, s:e], k[:, s:e], v[:, s:e], None) for s, e in zip(offsets[:-1], offsets[1:])], dim=1
            )
        else:
            o = self._attend(q, k, v, attention_mask)
        o = self.o_proj(o.reshape(batch_size, q_len, -1))
        return o, None, past_key_values

    @staticmethod
    def _positions(batch_size, q_len, past_len, attention_mask, cu_seqlens, device) -> torch.Tensor:
        """RoPE positions ``[B, T]``: packed sequences restart at 0 and padding is not counted."""
        if cu_seqlens is not None:
            return prepare_position_ids(cu_seqlens.to(device))[None]
        if attention_mask is None:
            return (past_len + torch.arange(q_len, device=device))[None].expand(batch_size, -1)
        # tokens before the mask's span, if any, count as real
        before = past_len + q_len - attention_mask.shape[-1]
        positions = before + attention_mask.to(device=device, dtype=torch.long).cumsum(-1) - 1
        return positions[:, -q_len:].clamp_min(0)

    def _attend(self, q, k, v, attention_mask) -> torch.Tensor:
        """q ``[B, Tq, H, D]``, k/v ``[B, Tk, Hk, D]`` with the queries last among the keys."""
        q_len, k_len = q.shape[1], k.shape[1]
        mask, is_causal = None, False
        if attention_mask is None and self.window_size is None and q_len in (1, k_len):
            is_causal = q_len > 1  # a single last query sees every key
        else:
            mask = attention_allowed(q_len, k_len, self.window_size, q.device)
            if attention_mask is not None:
                keys = attention_mask[:, -k_len:].to(device=q.device, dtype=torch.bool)
                if keys.shape[-1] < k_len:  # keys before the mask's span count as real
                    keys = F.pad(keys, (k_len - keys.shape[-1], 0), value=True)
                # a padded query may have no real key: it sees itself, so the softmax stays finite
                mask = (mask[None] & keys[:, None, :]) | attention_allowed(q_len, k_len, 1, q.device)
                mask = mask[:, None]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=self.num_heads != self.num_kv_heads,
        ).transpose(1, 2)
        if attention_mask is not None:
            o = o * attention_mask[:, -q_len:, None, None].to(o.dtype)
        return o
