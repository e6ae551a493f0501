"""Every Triton kernel of ours compiles for Hopper (sm_90a) with the installed Triton, on the CPU.

The interpreter runs a kernel's Python, not Triton's compiler, so it passes code that the
compiler refuses: in session 46 a name that changed type through a loop (``_`` in the dv
kernel) passed every interpreted test and failed on an H100 at its first launch. Here one call
of each op and module, interpreted at small shapes (float32, bf16 and fp16; dense and sparse;
packed sequences; either form of the chunk states and of dq/dk; the dots' precision the GPU
takes), records every launch, all of which go through ``CompiledLauncher``: the kernel, its
arguments' types, its compile-time values and launch options. A process without the
interpreter (``hopper_compile.py``) then compiles each distinct launch for sm_90a, as the JIT
would on the GPU, down to ptxas: Triton's CUDA backend is needed, a GPU is not. It compiles
with the Triton installed here, which may be newer than the GPU machine's (3.6): it catches what
Triton refuses to compile, not what one version miscompiles."""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from fla_factmem.modules import activations, convolution, norm
from fla_factmem.ops.compiled_launch import CompiledLauncher
from fla_factmem.ops.factorization_memory import launch
from tests.ops.factorization_memory.test_given_picks import picks_inputs, triton_given_picks
from tests.ops.factorization_memory.test_kernels import triton_chunk
from tests.ops.factorization_memory.test_sparse_kernels import triton_sparse_chunk
from tests.utils import make_inputs, offsets_of, run_with_grads

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="records launches under the interpreter (on a GPU they compile anyway)",
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def python_function(kernel):
    """The Python function under a kernel's decorators (heuristics, interpreter or JIT)."""
    while not inspect.isfunction(kernel):
        kernel = kernel.fn
    return kernel


def argument_record(x):
    """What the JIT compiles a positional argument as: a tensor's dtype and 16-byte alignment,
    an int's value (it specialises 1 and multiples of 16), a float, or None."""
    if isinstance(x, torch.Tensor):
        return {"dtype": str(x.dtype).removeprefix("torch."), "aligned": x.data_ptr() % 16 == 0}
    if isinstance(x, bool) or x is None:
        return {"constexpr": x}
    if isinstance(x, int):
        return {"int": x}
    if isinstance(x, float):
        return {"float": True}
    raise TypeError(f"no record for a kernel argument of type {type(x).__name__}")


def launch_record(kernel, args, keywords) -> dict:
    """One launch as ``hopper_compile.py`` takes it: the kernel's module and name, its positional
    arguments, and every other parameter's value, the heuristics' included (ours look only at
    whether an argument is None, so they are evaluated here)."""
    fn = python_function(kernel)
    names = list(inspect.signature(fn).parameters)
    values = dict(zip(names, args)) | keywords
    decorator = kernel
    while hasattr(decorator, "values") and hasattr(decorator, "fn"):
        values |= {name: heuristic(values) for name, heuristic in decorator.values.items()}
        decorator = decorator.fn
    return {
        "module": fn.__module__,
        "name": fn.__name__,
        "args": [argument_record(x) for x in args],
        "constexprs": {name: values[name] for name in names[len(args) :]},
        "options": {k: v for k, v in keywords.items() if k not in names},
    }


def dense_op(dtype, M, V, packed):
    """Forward and backward of the dense kernels (B=2, or two packed sequences) with an initial
    and a final state."""
    B, T, cu_seqlens = (1, 45, offsets_of([13, 32])) if packed else (2, 40, None)
    run_with_grads(triton_chunk, make_inputs(B, T, 2, M, V, dtype, N=2), None, cu_seqlens=cu_seqlens)


def sparse_op(dtype, M, topk, packed):
    """Forward and backward of the sparse kernels from the logits' top K."""
    B, T, cu_seqlens = (1, 29, offsets_of([9, 20])) if packed else (2, 20, None)
    run_with_grads(triton_sparse_chunk, make_inputs(B, T, 2, M, 32, dtype, N=2), topk, cu_seqlens=cu_seqlens)


def given_picks_op(dtype, M, K):
    """Forward and backward of the sparse kernels from given picks, on two packed sequences."""
    inputs, rows = picks_inputs(1, 29, 2, M, K, 32, dtype=dtype, N=2)
    run_with_grads(triton_given_picks(rows, M), inputs, None, cu_seqlens=offsets_of([9, 20]))


def decode(dtype, M, topk):
    """One decode step, dense (topk None) or sparse."""
    v, logits, eta, mu, h0 = (x.detach() for x in make_inputs(4, 1, 2, M, 32, dtype))
    launch.fused_recurrent_fwd(v, logits, eta, mu, h0, True, None, topk)


def modules(dtype):
    """The modules' kernels, forward and backward: biased sigmoid, the short convolution (with a
    bias, and packed without one) and the gated norm."""
    x = torch.randn(2, 24, 64, dtype=dtype, requires_grad=True)
    activations.BiasedSigmoidFunction.apply(x, torch.randn(64)).float().sum().backward()
    convolution.short_convolution(x, torch.randn(64, 4), torch.randn(64), "silu", None).float().sum().backward()
    packed = x[:1].detach().requires_grad_()
    convolution.short_convolution(packed, torch.randn(64, 4), None, None, offsets_of([10, 14])).float().sum().backward()
    g = torch.randn(2, 24, 64, dtype=dtype, requires_grad=True)
    norm.rms_norm_gated(x, g, torch.ones(64, requires_grad=True), 1e-5, "swish").float().sum().backward()


def recorded_launches(monkeypatch) -> list[dict]:
    """``launch_record`` of every launch of the calls above."""
    records = []
    launch_original = CompiledLauncher.launch

    def recording(self, grid, *args, **keywords):
        records.append(launch_record(self.kernel, args, keywords))
        return launch_original(self, grid, *args, **keywords)

    monkeypatch.setattr(CompiledLauncher, "launch", recording)
    # the dots' precision that the GPU takes (the interpreter gets exact float32 dots for every
    # dtype): these launches are compiled, and their interpreted numbers are not checked
    monkeypatch.setattr(launch, "dot_precision", lambda dtype: "ieee" if dtype == torch.float32 else "tf32")
    for walk in (True, False):  # the chunk states by the walk, and by the increments and the scan
        monkeypatch.setattr(launch, "walk_fills_gpu", lambda *args, walk=walk: walk)
        dense_op(torch.bfloat16, 64, 64, packed=not walk)
    dense_op(torch.float32, 64, 64, packed=True)
    dense_op(torch.float32, 24, 128, packed=False)  # dq/dk by levels (V > 64)
    dense_op(torch.float16, 256, 32, packed=False)
    for dtype in (torch.float32, torch.bfloat16):
        sparse_op(dtype, 40, 3, packed=dtype == torch.float32)
        decode(dtype, 64, None)
        decode(dtype, 64, 4)
        modules(dtype)
    given_picks_op(torch.bfloat16, 40, 5)
    return records


def test_every_kernel_compiles_for_hopper(monkeypatch):
    records = recorded_launches(monkeypatch)
    distinct = list({json.dumps(r, sort_keys=True): r for r in records}.values())
    launched = {r["name"] for r in distinct}
    kept = {
        python_function(x.kernel).__name__
        for module in (activations, convolution, norm, launch)
        for x in vars(module).values()
        if isinstance(x, CompiledLauncher)
    }
    assert launched == kept, f"kernels never launched here: {sorted(kept - launched)}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.ops.hopper_compile"],
        input=json.dumps(distinct),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-8000:]
