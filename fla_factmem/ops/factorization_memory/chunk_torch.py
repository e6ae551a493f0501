"""Chunked Factorization Memory in plain PyTorch: the CPU path and the kernels' ground truth.

Dense Factorization Memory is gated linear attention with key dimension M
(q = phi, k = theta, per-key log-decay g = log(1 - theta)). Within a chunk of C
tokens, token t reads token s <= t through the decay prod_{s < u <= t} (1 - theta_u),
and the memory carried between chunks is decayed by whole-chunk products.

Stability (SPEC section 3): every decay is computed as the exponential of a sum of
log-decays over exactly the span it covers, so every exponent is <= 0 and its
rounding is relative to the span's own size, never to a cumulative sum from the
chunk start of another token. ``log(1 - theta + DECAY_FLOOR)`` keeps theta = 1 finite:
the floor changes the result by DECAY_FLOOR relative, below float32 resolution, and
keeps the gradient through the decay (d/dtheta of (1 - theta) = -1) intact, because
every term that holds a decay factor scales with it, and autograd divides it out again.
Inactive states in the sparse variant have theta = 0, so their log-decay is exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from fla_factmem.ops.factorization_memory.routing import sequence_spans

DECAY_FLOOR = 1e-30
DEFAULT_CHUNK_SIZE = 16


def _chunk_batch(
    v: torch.Tensor,
    theta: torch.Tensor,
    phi: torch.Tensor,
    h0: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-length sequences: v ``[B, T, H, V]``, theta/phi ``[B, T, H, M]``, h0 ``[B, H, M, V]``."""
    T, C = v.shape[1], chunk_size
    pad = -T % C
    if pad:
        # padded tokens have theta = phi = 0: they neither change the memory nor read it
        v, theta, phi = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (v, theta, phi))
    v, theta, phi = (rearrange(x, "b (n c) h d -> b h n c d", c=C) for x in (v, theta, phi))

    g = torch.log(1 - theta + DECAY_FLOOR)
    # span[..., s, t, :] = sum of g over s < u <= t (0 where t <= s)
    after = torch.ones(C, C, dtype=torch.bool, device=v.device).triu(1)
    span = torch.where(after[:, :, None], g[..., None, :, :], 0).cumsum(-2)
    causal = after.T | torch.eye(C, dtype=torch.bool, device=v.device)  # [t, s]: s <= t
    decay_ts = torch.where(causal[:, :, None], span.transpose(-3, -2).exp(), 0)

    scores = torch.einsum("bhntj,bhnsj,bhntsj->bhnts", phi, theta, decay_ts)
    o = scores @ v

    decay_from_start = g.cumsum(-2).exp()  # [b, h, n, t, j]: prod over u <= t
    decay_to_end = span[..., :, -1, :].exp()  # [b, h, n, s, j]: prod over s < u < C
    increments = torch.einsum("bhnsj,bhnsv->bhnjv", theta * decay_to_end, v)
    chunk_decay = decay_from_start[..., -1, :, None]  # [b, h, n, j, 1]

    h, starts = h0, []
    for n in range(v.shape[2]):
        starts.append(h)
        h = chunk_decay[:, :, n] * h + increments[:, :, n]
    o = o + torch.einsum("bhntj,bhnjv->bhntv", phi * decay_from_start, torch.stack(starts, 2))
    o = rearrange(o, "b h n c d -> b (n c) h d")[:, :T]
    return o, h


def chunk_factorization_memory_torch(
    v: torch.Tensor,
    theta: torch.Tensor,
    phi: torch.Tensor,
    initial_state: torch.Tensor | None,
    offsets: list[int] | None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked Factorization Memory over precomputed weights, differentiable by autograd.

    Args:
        v: ``[B, T, H, V]`` in the compute dtype.
        theta, phi: ``[B, T, H, M]`` update and merge weights.
        initial_state: ``[N, H, M, V]`` or None for zeros.
        offsets: host copy of ``cu_seqlens``, or None.
        chunk_size: tokens per chunk; memory grows with T * chunk_size * M.

    Returns:
        ``o`` ``[B, T, H, V]`` in the compute dtype and the final states ``[N, H, M, V]``.
    """
    B, T, H, V = v.shape
    M = theta.shape[-1]
    N = B if offsets is None else len(offsets) - 1
    # log-decays cannot stand for a decay 1 - theta < 0, which eta > 1 (outside the contract) can
    # give: refused here, where it would give NaN, while the kernels and the token loop run it
    largest = theta.detach().amax().item()
    if largest > 1:
        raise ValueError(
            f"chunk_factorization_memory's PyTorch path needs eta * alpha <= 1 (`eta` in [0, 1]); got {largest:.6g}"
        )
    h0 = v.new_zeros(N, H, M, V) if initial_state is None else initial_state.to(v.dtype)
    if offsets is None:
        return _chunk_batch(v, theta, phi, h0, chunk_size)
    outputs, finals = [], []
    for n, (_, bos, eos) in enumerate(sequence_spans(B, T, offsets)):
        if eos == bos:
            finals.append(h0[n])
            continue
        o_seq, h_seq = _chunk_batch(v[:, bos:eos], theta[:, bos:eos], phi[:, bos:eos], h0[n : n + 1], chunk_size)
        outputs.append(o_seq)
        finals.append(h_seq[0])
    return torch.cat(outputs, 1), torch.stack(finals)
