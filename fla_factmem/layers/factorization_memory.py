"""The Factorization Memory mixer layer (SPEC section 4), with FLA's layer interface."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from fla.layers.utils import get_layer_cache, repad_hidden_states, unpad_hidden_states, update_layer_cache

from fla_factmem.layers.routing_diagnostics import (
    AttachAuxiliaryLoss,
    affinity,
    load_balance_loss,
    routing_statistics,
)
from fla_factmem.layers.utils import check_cached_batch, check_padding_mask
from fla_factmem.modules import FusedRMSNormGated, ShortConvolution, biased_sigmoid, split_linear, top_k_linear
from fla_factmem.ops import chunk_factorization_memory, fused_recurrent_factorization_memory
from fla_factmem.ops.factorization_memory.validation import takes_state_in_place
from fla_factmem.utils import is_positive_int, warn_once

MODES = ("chunk", "fused_recurrent")
RECURRENT_MAX_LEN = 64  # inputs this short, without autograd (decoding), take the token-by-token kernel


class FactorizationMemory(nn.Module):
    r"""Factorization Memory (arXiv 2511.00315): a Mamba-2-style mixer around an M x V memory per head.

    One GEMM, ``in_proj``, makes all the inputs of the memory from ``x`` ``[B, T, hidden_size]``:
    its outputs are, in order, ``H V`` pre-activations of v, ``H V`` of the output gate z, ``H M``
    routing logits and ``2 H`` pre-activations of eta and mu (the SPEC's W_v, W_z, W_alpha, W_eta
    and W_mu stacked, as Mamba-2 stacks its input projections). Per head:
    ``v = SiLU(short_conv(x W_v^T))`` (SiLU alone without the short convolution),
    ``logits = x W_alpha^T / temperature``, ``eta, mu = sigmoid(x [W_eta; W_mu]^T + eta_mu_bias)``
    (the first H entries of ``eta_mu_bias`` are eta's); the memory op turns them into ``o``
    ``[B, T, H, V]``, then ``y = o_proj(g_norm(o, z))``, where ``g_norm`` is a SiLU-gated RMS norm
    over all heads together (so the per-head merge rate ``mu`` keeps its meaning). Decoding (up to
    64 tokens without autograd) makes all of them in one GEMM, and the decode kernel reads the
    logits where they lie in its output and eta and mu as views of one ``[B, T, 2H]`` tensor (no
    copies); other calls run one GEMM per block of ``in_proj``'s rows. ``in_proj`` is used
    through its weight, so it must stay a plain ``nn.Linear``.

    Initialisation: PyTorch's defaults for the projections and a zero ``eta_mu_bias`` when built
    alone; inside the models, FLA's scheme (normal(0, initializer_range) weights, zero biases).
    Zero biases give eta = mu = 1/2 and, with small routing weights, near-uniform routing: every
    state starts as a slow moving average (theta about 1 / (2M) per token) and learns to
    specialise.

    Args:
        hidden_size: width D of the input and output.
        num_heads: heads H.
        head_dim: width V of one memory state; ``hidden_size // num_heads`` by default.
        num_memories: memory states M per head.
        topk: None for dense routing; K in [1, M] for the sparse variant (K = M is dense).
        temperature: routing logits are divided by it.
        mode: ``chunk`` or ``fused_recurrent``; short inputs without autograd (decoding) use
            ``fused_recurrent`` whatever the mode.
        use_short_conv: causal depthwise convolution on v, as in Mamba-2.
        conv_size: its width.
        conv_bias: whether it has a bias.
        norm_eps: epsilon of the output norm.
        track_routing: keep the routing diagnostics of every forward in ``self.routing_stats``
            (entropy, effective fraction of states used, load per state; see
            ``fla_factmem.layers.routing_diagnostics``). Off by default, and then free; it can be
            switched on an existing layer by setting the attribute.
        load_balance_coef: weight of the Switch-style load-balancing loss of the sparse routing
            (0 by default: off). When positive, training forwards add ``coef * loss`` to the
            gradient of whatever loss the output feeds (the loss value itself is unchanged and is
            reported as ``routing_stats["load_balance_loss"]``, unweighted). It is not scaled
            with the model's loss, so divide it yourself under gradient accumulation.
        routing_slice_tokens: sparse routing (``topk`` < M) in ``chunk`` mode only: None makes the
            routing logits of all tokens at once, ``[B, T, H, M]`` (the fastest, where they fit);
            an int makes them for at most this many tokens at a time and keeps each token's top K
            (``fla_factmem.modules.top_k_linear``), so that neither they nor their gradient ever
            exist whole: at M = 4096, H = 8, they take 64 KB a token each way in bf16. The
            routing diagnostics need all logits: with ``track_routing`` on, whole logits are made
            (said once), and it refuses a ``load_balance_coef``.
        layer_idx: the layer's index in the model; needed with a cache.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 4,
        head_dim: int | None = None,
        num_memories: int = 64,
        topk: int | None = None,
        temperature: float = 1.0,
        mode: str = "chunk",
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        norm_eps: float = 1e-5,
        track_routing: bool = False,
        load_balance_coef: float = 0.0,
        routing_slice_tokens: int | None = None,
        layer_idx: int | None = None,
    ):
        super().__init__()
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}; give head_dim")
            head_dim = hidden_size // num_heads
        for name, value in (
            ("hidden_size", hidden_size),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
            ("num_memories", num_memories),
            ("conv_size", conv_size),
        ):
            if not is_positive_int(value):
                raise ValueError(f"`{name}` must be a positive int; got {value!r}")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= num_memories):
            raise ValueError(f"`topk` must be None or an int in [1, num_memories={num_memories}]; got {topk!r}")
        if not temperature > 0:
            raise ValueError(f"`temperature` must be positive; got {temperature!r}")
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}; got {mode!r}")
        if not load_balance_coef >= 0:
            raise ValueError(f"`load_balance_coef` must be >= 0; got {load_balance_coef!r}")
        if load_balance_coef > 0 and (topk is None or topk == num_memories):
            raise ValueError("`load_balance_coef` balances the sparse routing; it needs topk < num_memories")
        if routing_slice_tokens is not None:
            if not is_positive_int(routing_slice_tokens):
                raise ValueError(f"`routing_slice_tokens` must be None or a positive int; got {routing_slice_tokens!r}")
            if topk is None or topk == num_memories or mode != "chunk" or load_balance_coef > 0:
                raise ValueError(
                    "`routing_slice_tokens` slices the sparse routing of the chunk mode: it needs topk < num_memories, "
                    "mode='chunk' and no load_balance_coef (whose loss needs all logits)"
                )

        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.num_memories, self.topk, self.temperature = num_memories, topk, temperature
        self.mode, self.use_short_conv, self.conv_size = mode, use_short_conv, conv_size
        self.track_routing, self.load_balance_coef = track_routing, load_balance_coef
        self.routing_slice_tokens = routing_slice_tokens
        self.routing_stats: dict[str, torch.Tensor] = {}
        self.layer_idx = layer_idx
        value_dim = num_heads * head_dim

        # one weight for v, z, the logits and the rates, so that decoding makes them in one GEMM
        self.split_sizes = (value_dim, value_dim, num_heads * num_memories, 2 * num_heads)
        self.in_proj = nn.Linear(hidden_size, sum(self.split_sizes), bias=False)
        self.eta_mu_bias = nn.Parameter(torch.zeros(2 * num_heads))
        if use_short_conv:
            self.v_conv1d = ShortConvolution(value_dim, conv_size, bias=conv_bias, activation="silu")
        self.g_norm = FusedRMSNormGated(value_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, None, object]:
        """
        Args:
            hidden_states: ``[B, T, hidden_size]``.
            attention_mask: optional ``[B, T]`` (or ``[B, past + T]`` when decoding) 0/1 padding mask.
            past_key_values: FLA ``Cache``; this layer keeps ``recurrent_state`` ``[N, H, M, V]``
                float32 and ``conv_state`` ``[N, H * V, conv_size]`` in it. Decoding without
                autograd updates a float32 cached ``recurrent_state`` tensor in place.
            use_cache: whether to write the states after this call into the cache.
            cu_seqlens (kwarg): ``[N + 1]`` offsets of sequences packed along T, with B = 1.

        Returns:
            ``(y [B, T, hidden_size], None, past_key_values)``.
        """
        batch_size, q_len, _ = hidden_states.shape
        check_padding_mask(attention_mask, batch_size, q_len)
        short_decode = q_len <= RECURRENT_MAX_LEN and not torch.is_grad_enabled()
        mode = "fused_recurrent" if short_decode else self.mode

        last_state = get_layer_cache(self, past_key_values)
        hidden_states, indices, cu_seqlens = unpad_hidden_states(
            hidden_states, kwargs.get("cu_seqlens"), attention_mask, q_len
        )
        if last_state is not None and last_state["recurrent_state"] is not None:
            n_seqs = batch_size if cu_seqlens is None else cu_seqlens.numel() - 1
            check_cached_batch(last_state["recurrent_state"].shape[0], n_seqs, "FactorizationMemory")
        if hidden_states.shape[1] == 0:
            return (
                self._all_padding(past_key_values, last_state, batch_size, q_len, hidden_states),
                None,
                past_key_values,
            )

        sliced_routing = self.routing_slice_tokens is not None and mode == "chunk"
        if sliced_routing and self.track_routing:
            warn_once(
                "sliced_routing_tracked",
                "fla_factmem: FactorizationMemory makes whole routing logits despite `routing_slice_tokens`, "
                "because `track_routing` is on and its diagnostics need them.",
            )
            sliced_routing = False
        if short_decode:
            # one GEMM, read in place: decoding a batch of 32 tokens at the 340M model's shape on an
            # H200, the four projections took 17.7 us of kernels and this one 6.4
            v, z, logits, eta_mu = F.linear(hidden_states, self.in_proj.weight).split(self.split_sizes, dim=-1)
        else:
            # one GEMM per block of rows: each input comes out contiguous, and the backward adds the
            # four gradients on x in the GEMMs' epilogues (split_linear). One GEMM took 0.15 ms more
            # per layer at that model's training shape (0.7 with rows of 6152 elements, not a
            # multiple of 16: unaligned loads), as its split's backward concatenates the gradients
            # (benchmarks/ops/NOTES.md)
            v, z, logits, eta_mu = split_linear(
                hidden_states, self.in_proj.weight, self.split_sizes, skip=(2,) if sliced_routing else ()
            )
        conv_state = None
        if self.use_short_conv:
            conv_state = last_state["conv_state"] if last_state is not None else None
            v, conv_state = self.v_conv1d(x=v, cache=conv_state, output_final_state=use_cache, cu_seqlens=cu_seqlens)
        else:
            v = F.silu(v)
        v = rearrange(v, "... (h d) -> ... h d", d=self.head_dim)
        given_picks = {}
        if sliced_routing:
            logits_weight = self.in_proj.weight.narrow(0, sum(self.split_sizes[:2]), self.split_sizes[2])
            logits, rows = top_k_linear(
                hidden_states, logits_weight, self.num_heads, self.topk, self.temperature, self.routing_slice_tokens
            )
            given_picks = dict(topk_indices=rows, num_memories=self.num_memories)
        else:
            logits = rearrange(logits, "... (h m) -> ... h m", m=self.num_memories)
            if self.temperature != 1:  # a pass over B * T * H * M logits each way, skipped at the default
                logits = logits / self.temperature
        eta_mu = biased_sigmoid(eta_mu, self.eta_mu_bias)
        eta, mu = eta_mu.unflatten(-1, (2, self.num_heads)).unbind(-2)
        aux_loss = self._routing_diagnostics(logits)

        initial_state = last_state["recurrent_state"] if last_state is not None else None
        if mode == "fused_recurrent":
            # decoding updates the cached state where it lies (sparse: K rows per token, no copy of
            # M), so a step allocates no state and reads and writes the cache at fixed addresses;
            # the kernels keep float32 states (a float64 model's cache is replaced instead)
            inplace = short_decode and use_cache and takes_state_in_place(initial_state)
            memory_op = partial(fused_recurrent_factorization_memory, inplace_final_state=inplace)
        else:
            memory_op = chunk_factorization_memory
        o, recurrent_state = memory_op(
            v,
            logits,
            eta,
            mu,
            topk=self.topk,
            initial_state=initial_state,
            output_final_state=use_cache,
            cu_seqlens=cu_seqlens,
            **given_picks,
        )
        update_layer_cache(self, past_key_values, recurrent_state=recurrent_state, conv_state=conv_state, offset=q_len)

        o = self.g_norm(rearrange(o, "... h d -> ... (h d)"), z)
        o = self.o_proj(o)
        if aux_loss is not None:
            o = AttachAuxiliaryLoss.apply(o, self.load_balance_coef * aux_loss)
        o = repad_hidden_states(o, indices, batch_size, q_len)
        return o, None, past_key_values

    def _all_padding(self, past_key_values, last_state, batch_size, q_len, empty) -> torch.Tensor:
        """A call whose tokens are all padding (say, a chunk of a right-padded batch past all its
        prompts), which the ops refuse as T = 0: zeros out, and the memory and the convolution's
        window stay as they were."""
        self.routing_stats = {}
        kept = {
            name: last_state[name] if last_state is not None else None for name in ("recurrent_state", "conv_state")
        }
        update_layer_cache(self, past_key_values, offset=q_len, **kept)
        return empty.new_zeros(batch_size, q_len, self.hidden_size)

    def _routing_diagnostics(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Fills ``routing_stats`` when tracking; returns the balancing loss when it trains."""
        balancing = self.load_balance_coef > 0 and self.training and torch.is_grad_enabled()
        self.routing_stats = {}  # never stale: it describes this forward or nothing
        if not (self.track_routing or balancing) or logits.numel() == 0:
            return None
        alpha = affinity(logits if balancing else logits.detach())  # one softmax for both
        if self.track_routing:
            self.routing_stats = routing_statistics(alpha, self.topk)
        if not balancing:
            return None
        aux_loss = load_balance_loss(alpha, self.topk)
        self.routing_stats["load_balance_loss"] = aux_loss.detach()
        return aux_loss
