"""Launching a Triton kernel again without the JIT's per-call dispatch.

A decode step is one short kernel (6.5 to 24 us on an H200 in a graph of 16 steps), and the
dispatch of Triton 3.6's JIT in front of it (binding the arguments, their specialisation and
cache key, the heuristics) costs more host time than the launch itself: on the H200 machine,
21.7 us a call through ``kernel[grid](...)`` against 6.6 us through the compiled kernel's
``run`` (benchmarks/ops/NOTES.md). With the decode kernel at 7 us, that host time is most of an
eager step's wall time. The chunked ops make 9 (dense) or 10 (sparse) launches a
forward+backward, whose host time through the JIT came near their kernels' at T = 4096 (the
dense op's on the H200: 0.87 and 0.59 ms of host time at M=64 and 256 through the JIT, 0.28 and
0.35 ms kept, against 1.03 ms of kernels at M=64).

TorchDynamo cannot trace these launches, so every public function that reaches them (the chunk
and fused recurrent ops, ``biased_sigmoid``, ``short_convolution``, the gated norm's,
``top_k_linear``) is ``torch.compiler.disable``d, as FLA's chunk ops are: in a
``torch.compile``d model they run eagerly between its graphs, at about 0.3 to 0.45 us of host
time a call for the decorator (on this project's 2-core x86 CPU), instead of Dynamo tracing into
them until it breaks the graph there anyway."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# a bound on the kept launchers, should a caller cycle through many shapes
MAX_LAUNCHERS = 256


def _specialization(arg: Any) -> Any:
    """What the JIT specialises a kernel argument on: for tensors the dtype and whether the
    address is 16-byte aligned, for ints whether they are 1, divisible by 16, and fit int32, for
    floats nothing; None and constexpr values stand for themselves. At least as fine as Triton
    3.6's own key, so one kept launcher never serves arguments that the JIT would have compiled
    differently."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, int) and not isinstance(arg, bool):
        return arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31
    if isinstance(arg, float):
        return float
    return arg


def _unwrap(kernel) -> tuple[JITFunction | None, list[tuple[str, Callable]]]:
    """The JIT function under a kernel's decorators, and the ``@triton.heuristics`` among them,
    outermost first as Triton applies them; (None, []) when Triton interprets the kernel."""
    heuristics = []
    while not isinstance(kernel, JITFunction):
        if not hasattr(kernel, "fn"):
            return None, []
        heuristics += list(getattr(kernel, "values", {}).items())
        kernel = kernel.fn
    return kernel, heuristics


def is_interpreted(kernel) -> bool:
    """Whether Triton interprets ``kernel`` (``TRITON_INTERPRET=1`` when it was defined)."""
    return _unwrap(kernel)[0] is None


def _launch_hooks_registered() -> bool:
    """Whether a profiler registered launch hooks (Triton 3.6 keeps them in chains, older ones as
    None or a function): those want each launch's metadata, which only the full path builds."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return any(getattr(hook, "calls", hook) for hook in hooks)


class KeptKernel(NamedTuple):
    """A kernel the JIT compiled, with the grid (3 dims) of the launch that returned it and the
    arguments after the positional ones (constexprs, heuristics' values) in signature order."""

    compiled: CompiledKernel
    grid: tuple[int, int, int]
    tail: tuple


def launch_kept(kept: KeptKernel, args: tuple, device: int | None = None) -> None:
    """Launches a kept kernel on the current stream of ``device`` (the current device if None)
    with the positional ``args``; the caller sees to it that they have the specialisation it was
    compiled for (``CompiledLauncher`` by its key)."""
    compiled, grid, tail = kept
    if _launch_hooks_registered():
        compiled[grid](*args, *tail)
        return
    stream = driver.active.get_current_stream(driver.active.get_current_device() if device is None else device)
    compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, *tail)


class CompiledLauncher:
    """Launches ``kernel[grid](*args, **constexprs)`` through the kernel that the JIT compiled for
    the same device and argument specialisation, on any grid.

    The first call of each specialisation goes through the JIT (which compiles or finds the
    kernel and launches it); later ones call the compiled kernel's launcher on the current
    stream with the same arguments and, appended in signature order, the constexprs and the
    heuristics' values. Under ``TRITON_INTERPRET=1`` every call goes through the interpreter,
    and with launch hooks registered (profilers) through the compiled kernel's full launch path.

    Takes the positional arguments first in the kernel's signature and everything after them
    (constexprs, heuristic values) as keywords; launch options such as ``num_warps`` also go in
    ``constexprs``.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        jit, self.heuristics = _unwrap(kernel)
        self.arg_names = jit.arg_names if jit is not None else None
        self.launchers: dict[tuple, KeptKernel] = {}

    def launch(self, grid: tuple[int, ...], *args, **constexprs) -> KeptKernel | None:
        """Launches the kernel; returns the compiled kernel kept for this specialisation, with this
        call's grid (None when Triton interprets the kernel), which ``launch_kept`` launches again."""
        if self.arg_names is None:
            self.kernel[grid](*args, **constexprs)
            return None
        device = driver.active.get_current_device()
        # no grid in the key: Triton compiles the same kernel for every grid, and the dense op's
        # grid changes with every batch of packed sequences of other lengths
        key = (device, tuple(map(_specialization, args)), tuple(constexprs.items()))
        kept = self.launchers.get(key)
        grid = (*grid, 1, 1)[:3]
        if kept is None:
            compiled = self.kernel[grid](*args, **constexprs)
            if len(self.launchers) >= MAX_LAUNCHERS:
                self.launchers.clear()
            kept = self.launchers[key] = KeptKernel(compiled, grid, self._tail(args, constexprs))
            return kept
        if kept.grid != grid:
            kept = kept._replace(grid=grid)
        launch_kept(kept, args, device)
        return kept

    def _tail(self, args: tuple, constexprs: dict) -> tuple:
        """The values of the parameters after the positional ones, in signature order: the given
        constexprs and the heuristics' values, which depend only on what the key holds."""
        values = {**dict(zip(self.arg_names, args)), **constexprs}
        for name, heuristic in self.heuristics:
            values[name] = heuristic(values)
        rest = self.arg_names[len(args) :]
        missing = [name for name in rest if name not in values]
        if missing:
            raise TypeError(f"CompiledLauncher: no value for the kernel parameters {missing}")
        return tuple(values[name] for name in rest)
