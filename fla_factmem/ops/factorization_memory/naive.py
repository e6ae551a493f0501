"""The definition of Factorization Memory: the step-by-step recurrence of SPEC section 2.

Nothing here is clever on purpose: every other implementation is tested against it.
"""

from __future__ import annotations

import torch

from fla_factmem.ops.factorization_memory.routing import picks_as_dense_logits, run_on_weights, sequence_spans
from fla_factmem.ops.factorization_memory.validation import validate_inputs


def recurrent_factorization_memory_torch(
    v: torch.Tensor,
    theta: torch.Tensor,
    phi: torch.Tensor,
    initial_state: torch.Tensor | None,
    offsets: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over precomputed weights, one token at a time.

    Args:
        v: ``[B, T, H, V]`` in the compute dtype.
        theta, phi: ``[B, T, H, M]`` update and merge weights.
        initial_state: ``[N, H, M, V]`` or None for zeros.
        offsets: host copy of ``cu_seqlens``, or None.

    Returns:
        ``o`` ``[B, T, H, V]`` in the compute dtype and the final states ``[N, H, M, V]``.
    """
    B, T, H, V = v.shape
    M = theta.shape[-1]
    outputs, finals = [], []
    for n, (b, bos, eos) in enumerate(sequence_spans(B, T, offsets)):
        h = v.new_zeros(H, M, V) if initial_state is None else initial_state[n].to(v.dtype)
        o_seq = []
        for t in range(bos, eos):
            th = theta[b, t, :, :, None]
            h = (1 - th) * h + th * v[b, t, :, None, :]
            o_seq.append((phi[b, t, :, :, None] * h).sum(-2))
        outputs.append(torch.stack(o_seq) if o_seq else v.new_zeros(0, H, V))
        finals.append(h)
    if offsets is None:
        o = torch.stack(outputs)
    else:
        o = torch.cat(outputs)[None]
    return o, torch.stack(finals)


def naive_factorization_memory(
    v: torch.Tensor,
    logits: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    topk: int | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    topk_indices: torch.Tensor | None = None,
    num_memories: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Factorization Memory by its definition, one token at a time (reference only; slow).

    For each sequence and head, with :math:`h_0` the initial state:
    :math:`\alpha_t = \mathrm{softmax}(\mathrm{logits}_t)` (over the top-``topk`` logits
    when sparse), :math:`\theta_t = \eta_t \alpha_t`, :math:`\phi_t = \mu_t \alpha_t`,
    :math:`h_t[j] = (1 - \theta_t[j]) h_{t-1}[j] + \theta_t[j] v_t` and
    :math:`o_t = \sum_j \phi_t[j] h_t[j]`.

    Args:
        v: ``[B, T, H, V]`` values written into the memory.
        logits: ``[B, T, H, M]`` routing logits (already divided by the temperature).
        eta: ``[B, T, H]`` update rates in [0, 1].
        mu: ``[B, T, H]`` merge rates in [0, 1].
        topk: ``None`` for dense routing, or K in [1, M] for the sparse variant (the K largest
            logits of each token; among equal logits the lower rows, on every device).
        initial_state: ``[N, H, M, V]`` memory before the first token; zeros if None.
        output_final_state: whether to return the memory after the last token.
        cu_seqlens: ``[N + 1]`` int offsets of packed sequences (then B must be 1).
        topk_indices: ``[B, T, H, K]`` each token's picks, made by the caller, with ``logits``
            their ``[B, T, H, K]`` logits, as in :func:`chunk_factorization_memory`: here
            scattered into ``[B, T, H, M]`` logits that are -inf elsewhere.
        num_memories: M, with ``topk_indices`` only.

    Returns:
        ``o`` ``[B, T, H, V]`` in the dtype of ``v``, and the final state ``[N, H, M, V]``
        in float32 (float64 for float64 inputs) if ``output_final_state`` else None.
    """
    M = validate_inputs(v, logits, eta, mu, topk, initial_state, cu_seqlens, topk_indices, num_memories).M
    if topk_indices is not None:
        logits, topk = picks_as_dense_logits(logits, topk_indices, M), logits.shape[-1]
    return run_on_weights(
        recurrent_factorization_memory_torch, v, logits, eta, mu, topk, initial_state, output_final_state, cu_seqlens
    )
