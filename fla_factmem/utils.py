"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emits ``message`` as a UserWarning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will track a call on these inputs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def on_device_of(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context that makes x's GPU the current one while Triton launches kernels for it (they
    go to the current device, as FLA's ``input_guard`` also sees to): a model on ``cuda:1`` with
    ``cuda:0`` current, as Hugging Face's ``device_map`` places layers. A no-op where it already
    is current, or for CPU tensors."""
    index = x.get_device()  # -1 on the CPU; cheaper than x.device, as decoding counts microseconds
    if index >= 0 and index != torch.cuda.current_device():
        return torch.cuda.device(index)
    return contextlib.nullcontext()


def check_cu_seqlens_values(offsets: Sequence[int], T: int) -> None:
    """Checks host-side ``cu_seqlens`` values: they run from 0 to T and never decrease."""
    if offsets[0] != 0 or offsets[-1] != T:
        raise ValueError(f"`cu_seqlens` must start at 0 and end at T = {T}; got {offsets[0]} ... {offsets[-1]}")
    if any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"`cu_seqlens` must be non-decreasing; got {list(offsets)}")


def host_offsets(cu_seqlens: torch.Tensor | None, T: int) -> list[int] | None:
    """The checked host copy of ``cu_seqlens`` ``[N + 1]`` (offsets from 0 to T) as a list, for
    the PyTorch paths and the layers' per-sequence loops (a device sync for CUDA tensors)."""
    if cu_seqlens is None:
        return None
    offsets = cu_seqlens.tolist()
    check_cu_seqlens_values(offsets, T)
    return offsets


def is_positive_int(value) -> bool:
    """Whether ``value`` is an int >= 1 (a bool, though an int to Python, is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (n >= 1). ``triton.next_power_of_2`` and ``triton.cdiv`` are
    constexpr functions, which cost 1.5 us a call on the host (Triton 3.6, the CI machine's CPU),
    against 0.04 us here; a layer's eager decode step makes some eight such calls (the op's
    launch, ``biased_sigmoid`` and the gated norm)."""
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints (see ``next_power_of_2``)."""
    return -(-a // b)
