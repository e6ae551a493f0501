"""Input checks shared by every Factorization Memory op.

Everything here reads tensor metadata only (shapes, dtypes, devices), so no check
forces a GPU sync. The values of ``cu_seqlens`` are checked by
:func:`fla_factmem.utils.host_offsets` where an implementation reads them on the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fla_factmem.utils import is_positive_int

SUPPORTED_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16, torch.float64))
_DTYPE_NAMES = "float32, bfloat16, float16 (or float64 on the PyTorch paths)"


class Dims(NamedTuple):
    """The sizes of one call: batch, length, heads, memory states, state width, sequences."""

    B: int
    T: int
    H: int
    M: int
    V: int
    N: int


def _check_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"`{name}` must be a floating tensor of dtype {_DTYPE_NAMES}; got {x.dtype}")


def _check_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"`{name}` is on {x.device} but `v` is on {device}; all inputs must share one device")


def validate_inputs(
    v: torch.Tensor,
    logits: torch.Tensor,
    eta: torch.Tensor,
    mu: torch.Tensor,
    topk: int | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    topk_indices: torch.Tensor | None = None,
    num_memories: int | None = None,
) -> Dims:
    """Checks the arguments of a Factorization Memory op and returns their sizes. With
    ``topk_indices`` (the rows each token picks, ``[B, T, H, K]``), ``logits`` holds the picks'
    logits, ``[B, T, H, K]``, and M is ``num_memories``.

    Raises ``TypeError`` or ``ValueError`` naming the offending argument.
    """
    for name, x in (("v", v), ("logits", logits), ("eta", eta), ("mu", mu)):
        _check_float(name, x)
    if v.ndim != 4:
        raise ValueError(f"`v` must have shape [B, T, H, V]; got {v.ndim} dims {tuple(v.shape)}")
    B, T, H, V = v.shape
    if logits.ndim != 4 or logits.shape[:3] != (B, T, H):
        last = "M" if topk_indices is None else "K"  # with given picks, their logits
        raise ValueError(
            f"`logits` must have shape [B, T, H, {last}] = [{B}, {T}, {H}, {last}]; got {tuple(logits.shape)}"
        )
    M = logits.shape[-1]
    if topk_indices is not None:
        M = _check_given_picks(logits, topk, topk_indices, num_memories, v.device)
    elif num_memories is not None:
        raise ValueError("`num_memories` goes with `topk_indices`; without them M is `logits.shape[-1]`")
    for name, x in (("eta", eta), ("mu", mu)):
        if x.shape != (B, T, H):
            raise ValueError(f"`{name}` must have shape [B, T, H] = [{B}, {T}, {H}]; got {tuple(x.shape)}")
    if B < 1 or T < 1 or H < 1 or V < 1 or M < 1:
        raise ValueError(f"B, T, H, V and M must be >= 1; got B={B}, T={T}, H={H}, V={V}, M={M}")
    device = v.device
    for name, x in (("logits", logits), ("eta", eta), ("mu", mu)):
        _check_device(name, x, device)

    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, int):
            raise TypeError(f"`topk` must be None or an int; got {type(topk).__name__}")
        if not 1 <= topk <= M:
            raise ValueError(f"`topk` must satisfy 1 <= topk <= M = {M}; got {topk}")

    N = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"`cu_seqlens` must be a torch.Tensor; got {type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"`cu_seqlens` must be int32 or int64; got {cu_seqlens.dtype}")
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"`cu_seqlens` must be 1-D with N + 1 >= 2 entries; got shape {tuple(cu_seqlens.shape)}")
        if B != 1:
            raise ValueError(f"with `cu_seqlens` the batch must be packed into B = 1; got B = {B}")
        _check_device("cu_seqlens", cu_seqlens, device)
        N = cu_seqlens.numel() - 1

    if initial_state is not None:
        _check_float("initial_state", initial_state)
        if initial_state.shape != (N, H, M, V):
            raise ValueError(
                f"`initial_state` must have shape [N, H, M, V] = [{N}, {H}, {M}, {V}]; got {tuple(initial_state.shape)}"
            )
        _check_device("initial_state", initial_state, device)
    return Dims(B, T, H, M, V, N)


def _check_given_picks(
    logits: torch.Tensor, topk: int | None, topk_indices: torch.Tensor, num_memories: int | None, device: torch.device
) -> int:
    """Checks picks made by the caller and returns M. Their values (distinct rows in [0, M)) are
    not checked: that would sync the GPU."""
    if not isinstance(topk_indices, torch.Tensor) or topk_indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"`topk_indices` must be an int32 or int64 tensor; got {getattr(topk_indices, 'dtype', type(topk_indices).__name__)}"
        )
    if topk_indices.shape != logits.shape:
        if topk_indices.shape[:-1] == logits.shape[:-1] and logits.shape[-1] == num_memories:
            raise ValueError(
                f"with `topk_indices`, `logits` holds the picks' logits only, [B, T, H, K] = "
                f"{tuple(topk_indices.shape)} (say, `logits.gather(-1, topk_indices)`); got all M = "
                f"{num_memories} of them, {tuple(logits.shape)}"
            )
        raise ValueError(
            f"`topk_indices` must have the shape of `logits` (the picks' logits, [B, T, H, K]) = "
            f"{tuple(logits.shape)}; got {tuple(topk_indices.shape)}"
        )
    if isinstance(num_memories, bool) or not isinstance(num_memories, int):
        raise TypeError(f"`topk_indices` needs `num_memories`, the M the rows index, as an int; got {num_memories!r}")
    K = logits.shape[-1]
    if not 1 <= K <= num_memories:
        raise ValueError(f"`topk_indices` picks K = {K} rows of M = `num_memories` = {num_memories}: need 1 <= K <= M")
    if topk is not None and topk != K:
        raise ValueError(f"`topk` = {topk} differs from the K = {K} picks of `topk_indices`; leave it None")
    _check_device("topk_indices", topk_indices, device)
    return num_memories


def takes_state_in_place(state: torch.Tensor | None) -> bool:
    """Whether the decode kernels can write the final state into ``state``: contiguous float32."""
    return state is not None and state.dtype == torch.float32 and state.is_contiguous()


def check_inplace_state(initial_state: torch.Tensor | None, needs_grad: bool) -> None:
    """Checks that ``initial_state`` can take the final state in place."""
    if initial_state is None:
        raise ValueError("`inplace_final_state=True` needs an `initial_state` to update")
    if not takes_state_in_place(initial_state):
        raise ValueError(
            f"`inplace_final_state=True` needs a contiguous float32 `initial_state`; got {initial_state.dtype}"
            f"{'' if initial_state.is_contiguous() else ', not contiguous'}"
        )
    if needs_grad:
        raise ValueError("`inplace_final_state=True` works without autograd only (decoding under torch.no_grad())")


def check_chunk_size(chunk_size: int) -> None:
    """Raises ``ValueError`` unless ``chunk_size`` is a positive int."""
    if not is_positive_int(chunk_size):
        raise ValueError(f"`chunk_size` must be a positive int; got {chunk_size!r}")
