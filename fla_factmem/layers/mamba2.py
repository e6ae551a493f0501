"""Mamba-2 whose SSD runs on FLA's ``chunk_gla``, for machines without mamba_ssm."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from fla.layers import mamba2 as fla_mamba2
from fla.ops.gla import chunk_gla

from fla_factmem.layers.utils import check_padding_mask


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


class Mamba2(fla_mamba2.Mamba2):
    """FLA's ``Mamba2`` layer with its sequence path on FLA's chunked GLA kernels.

    Same parameters, arguments, cache and results as ``fla.layers.mamba2.Mamba2``; only how
    the SSD of a multi-token forward is computed differs. Without mamba_ssm, FLA's layer runs
    a naive PyTorch SSD whose ``[B, T/chunk, chunk, chunk, H, N]`` intermediates take tens of
    GB at training shapes. The SSD is gated linear attention with a decay that is one scalar
    per head and token, so it maps onto ``chunk_gla`` exactly:

        h_t = exp(dt_t A) h_{t-1} + B_t (dt_t x_t)^T,    y_t = C_t^T h_t + D x_t

    with q = C, k = B, v = dt x, g = dt A broadcast over the state dimension N, and scale 1.
    Single-token decoding keeps FLA's step. Like FLA's layer (whose activations are Triton
    kernels), it needs CUDA tensors. The ``mamba2`` mixer picks FLA's layer when
    mamba_ssm is installed and this one otherwise, and checkpoints load into either.

    Args: those of ``fla.layers.mamba2.Mamba2`` (``chunk_size`` is unused here: ``chunk_gla``
    picks its own). Inputs ``hidden_states [B, T, hidden_size]``; ``attention_mask [B, T]``
    (0 for left padding); no packed sequences (``cu_seqlens``, refused); outputs
    ``[B, T, hidden_size]``; the recurrent state in the cache is ``[B, H, head_dim, state_size]``
    float32, as in FLA.
    """

    def __init__(self, *args, **kwargs):
        # FLA's constructor warns about its naive SSD and its Triton convolution, neither of which
        # this layer runs (its convolution is the nn.Conv1d that FLA's PyTorch path uses too)
        not_ours = _DropMessages("fast path is not available", "does not recommend using Triton's conv1d")
        fla_mamba2.logger.addFilter(not_ours)
        try:
            super().__init__(*args, **kwargs)
        finally:
            fla_mamba2.logger.removeFilter(not_ours)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs,
    ):
        if hidden_states.shape[1] == 0:
            return hidden_states, None, past_key_values
        last_state = fla_mamba2.get_layer_cache(self, past_key_values)
        if kwargs.get("cu_seqlens") is not None:
            # as FLA's layer, which ignores it: the convolution and chunk_gla would run across the
            # packed sequences' boundaries
            raise ValueError("Mamba2 takes no packed sequences (cu_seqlens); pass a padded batch with attention_mask")
        if hidden_states.device.type != "cuda":
            raise RuntimeError(f"Mamba2 runs FLA's Triton kernels and needs CUDA tensors; got {hidden_states.device}")
        if last_state is not None:  # FLA's own single-token step
            return super().forward(hidden_states, attention_mask, past_key_values, use_cache, output_attentions)
        check_padding_mask(attention_mask, *hidden_states.shape[:2])
        output, conv_state, ssm_state = self.chunked_forward(hidden_states, attention_mask, use_cache)
        fla_mamba2.update_layer_cache(
            self, past_key_values, recurrent_state=ssm_state, conv_state=conv_state, offset=hidden_states.shape[1]
        )
        return output, None, past_key_values

    def chunked_forward(
        self, input_states: torch.Tensor, attention_mask: torch.Tensor | None, use_cache: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(output [B, T, hidden_size], conv_state [B, conv_dim, conv_kernel] or None,
        ssm_state [B, H, head_dim, state_size])`` of a forward from the empty state."""
        batch_size, seq_len, _ = input_states.shape
        dtype = input_states.dtype
        input_states = fla_mamba2.apply_mask_to_padding_states(input_states, attention_mask)
        gate, xBC, dt = self.in_proj(input_states).split([self.intermediate_size, self.conv_dim, self.num_heads], -1)

        xBC = fla_mamba2.apply_mask_to_padding_states(xBC, attention_mask)
        conv_state = None
        if use_cache:
            conv_state = F.pad(xBC.transpose(1, 2), (self.conv_kernel_size - seq_len, 0))
        xBC = self.act(self.conv1d(xBC.transpose(1, 2))[..., :seq_len].transpose(1, 2))
        xBC = fla_mamba2.apply_mask_to_padding_states(xBC, attention_mask)
        x, B, C = xBC.split([self.intermediate_size, *(2 * [self.n_groups * self.ssm_state_size])], -1)

        dt = F.softplus(dt.float() + self.dt_bias).clamp(*self.dt_limit)  # [B, T, H]
        A = -torch.exp(self.A_log.float())
        x = x.view(batch_size, seq_len, self.num_heads, self.head_dim)
        heads_per_group = self.num_heads // self.n_groups
        B, C = (
            t.view(batch_size, seq_len, self.n_groups, self.ssm_state_size).repeat_interleave(heads_per_group, 2)
            for t in (B, C)
        )
        g = (dt * A)[..., None].expand(-1, -1, -1, self.ssm_state_size).contiguous()
        y, ssm_state = chunk_gla(
            q=C,
            k=B,
            v=(x * dt[..., None]).to(x.dtype),
            g=g,
            scale=1.0,
            output_final_state=True,
            state_v_first=True,
        )
        y = y + x * self._get_D(expand_to_head_dim=True).to(x.dtype)
        y = y.reshape(batch_size, seq_len, self.intermediate_size)
        y = self.norm(y, gate) if self.rmsnorm else y * self.act(gate)
        return self.out_proj(y.to(dtype)), conv_state, ssm_state
