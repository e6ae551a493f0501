"""The launcher that skips Triton's JIT dispatch (decode steps, the chunked ops): its
specialisation key and the chunked ops' launch arguments on the CPU, and on the GPU (``cuda``
marker) that kept launchers give the JIT's results, also for arguments that the JIT compiles
differently (unaligned tensors, varlen)."""

import inspect
import os

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from fla_factmem.ops.compiled_launch import CompiledLauncher, _specialization
from fla_factmem.ops.factorization_memory import launch
from tests.utils import assert_close, cuda_decode_calls, unaligned


def test_specialization_separates_what_the_jit_separates():
    x = torch.zeros(64, dtype=torch.bfloat16)
    assert _specialization(x) == (torch.bfloat16, True)
    assert _specialization(unaligned(x)) == (torch.bfloat16, False)
    assert _specialization(x.float()) != _specialization(x)
    assert len({_specialization(n) for n in (1, 2, 16, 2**31)}) == 4
    assert _specialization(0.5) == _specialization(2.0)
    assert _specialization(None) is None and _specialization(True) is True


def toy_kernel(x, y, n, A: tl.constexpr, FLAG: tl.constexpr, B: tl.constexpr):
    pass


def test_tail_appends_constexprs_and_heuristics_in_signature_order():
    # a JITFunction built directly: the interpreter would otherwise replace it, and the launcher
    # would pass every call to it
    kernel = triton.heuristics({"FLAG": lambda args: args["y"] is not None})(JITFunction(toy_kernel))
    launcher = CompiledLauncher(kernel)
    assert launcher._tail((1, None, 3), {"A": 5, "B": 7, "num_warps": 2}) == (5, False, 7)
    with pytest.raises(TypeError, match="'B'"):
        launcher._tail((1, None, 3), {"A": 5})
    if os.environ.get("TRITON_INTERPRET") == "1":  # interpreted: no JIT dispatch to skip
        assert CompiledLauncher(triton.jit(toy_kernel)).arg_names is None


def jit_twin(kernel):
    """The kernel as Triton builds it on a GPU: its heuristics over a JITFunction of its Python
    function (under the interpreter, ``triton.jit`` makes an interpreted function instead)."""
    layers = []
    while not inspect.isfunction(kernel):
        layers.append(getattr(kernel, "values", None))
        kernel = kernel.fn
    twin = JITFunction(kernel)
    for values in reversed(layers):
        if values is not None:
            twin = triton.heuristics(values)(twin)
    return twin


def op_launches(op: str) -> list[CompiledLauncher]:
    """The launchers of one forward+backward of the op, in order: "dense" (its dq/dk kernel by
    levels), "dense-walk" (that kernel as a walk, ``launch.dqk_walks``) or "sparse"."""
    if op.startswith("dense"):
        dqk = launch.BWD_DQK_WALK if op == "dense-walk" else launch.BWD_DQK
        return [launch.LOGSUMEXP, launch.STATE_INCREMENT, launch.STATE_SCAN, launch.FWD_O, launch.STATE_INCREMENT,
                launch.STATE_SCAN, launch.BWD_DOMINANT, dqk, launch.BWD_DV]  # fmt: skip
    # each scan twice: its split rows' pieces (SUMMARY), then the scan
    return [launch.SPARSE_ROUTING, launch.SPARSE_KEYS, launch.SPARSE_EVENTS, launch.SPARSE_FWD, launch.SPARSE_FWD,
            launch.SUM_OVER_PICKS, launch.SPARSE_BWD, launch.SPARSE_BWD, launch.SUM_OVER_PICKS,
            launch.SPARSE_ROUTING_BWD]  # fmt: skip


@pytest.mark.parametrize("op", ["dense", "dense-walk", "sparse"])
@pytest.mark.parametrize("M", [32, 80])
def test_op_launches_resolve_every_parameter(monkeypatch, op, M):
    """Every launch of the chunked op, forward and backward, gives its kernel's non-constexpr
    parameters positionally and the rest by name or through the heuristics, as the kept
    launchers on a GPU need (M = 80: the dense backward's rows in several blocks)."""
    from tests.ops.factorization_memory.test_kernels import triton_chunk
    from tests.ops.factorization_memory.test_sparse_kernels import triton_sparse_chunk
    from tests.utils import make_inputs

    calls = []
    original = CompiledLauncher.launch

    def recording(self, grid, *args, **constexprs):
        calls.append((self.kernel, args, constexprs))
        original(self, grid, *args, **constexprs)

    monkeypatch.setattr(CompiledLauncher, "launch", recording)
    monkeypatch.setattr(launch, "DQK_WALK_MAX_V", 1 << 30 if op == "dense-walk" else 0)
    v, logits, eta, mu, h0 = make_inputs(1, 20, 2, M, 16)
    if op.startswith("dense"):
        o, ht = triton_chunk(v, logits, eta, mu, None, h0, True)
    else:
        o, ht = triton_sparse_chunk(v, logits, eta, mu, 4, h0, True)
    (o.sum() + ht.sum()).backward()
    assert [kernel for kernel, _, _ in calls] == [launcher.kernel for launcher in op_launches(op)]
    for kernel, args, constexprs in calls:
        twin = CompiledLauncher(jit_twin(kernel))
        jit = twin.kernel if isinstance(twin.kernel, JITFunction) else twin.kernel.fn
        positional = [p.name for p in jit.params if not p.is_constexpr]
        assert twin.arg_names[: len(args)] == positional, jit.fn.__name__
        assert len(twin._tail(args, constexprs)) == len(twin.arg_names) - len(args)


@pytest.mark.cuda
@pytest.mark.parametrize("topk", [None, 16])
def test_cuda_kept_launchers_match_the_jit(topk):
    """Each specialisation's first call goes through the JIT, its second through the kept
    launcher: both give the same bits, and the reference's values."""
    launcher = launch.SPARSE_DECODE if topk else launch.DENSE_DECODE
    launcher.launchers.clear()
    calls, h0, o_ref, ht_ref = cuda_decode_calls(topk)
    for kept, (*args, cu_seqlens) in enumerate(calls, 1):
        o_jit, ht_jit = launch.fused_recurrent_fwd(*args, h0, True, cu_seqlens, topk)
        o, ht = launch.fused_recurrent_fwd(*args, h0, True, cu_seqlens, topk)
        assert len(launcher.launchers) == kept
        assert torch.equal(o, o_jit) and torch.equal(ht, ht_jit)
        assert_close("o", o.reshape(o_ref.shape), o_ref, 1e-2)
        assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.cuda
def test_cuda_kept_launchers_call_launch_hooks():
    """A profiler's launch hook sees kept launches too, with their metadata."""
    from triton import knobs

    chain = knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip("this Triton keeps one launch hook, not a chain")
    v, logits, eta, mu = (
        x.cuda()
        for x in (torch.randn(2, 1, 2, 64), torch.randn(2, 1, 2, 128), torch.rand(2, 1, 2), torch.rand(2, 1, 2))
    )
    h0 = torch.randn(2, 2, 128, 64, device="cuda")
    launch.fused_recurrent_fwd(v, logits, eta, mu, h0, True, None, 4)  # keeps the launcher
    seen = []

    def hook(metadata):
        seen.append((metadata if isinstance(metadata, dict) else metadata.get())["name"])  # 3.6: a LazyDict

    chain.add(hook)
    try:
        launch.fused_recurrent_fwd(v, logits, eta, mu, h0, True, None, 4)
    finally:
        chain.remove(hook)
    assert seen == ["fused_recurrent_sparse_fwd_kernel"]


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("op", "other_shape"),
    [("dense", 4), ("dense", (250, 350)), ("dense-walk", 4), ("dense-walk", (250, 350)), ("sparse", 4)],
)
def test_cuda_op_kept_launchers_match_the_jit(monkeypatch, op, other_shape):
    """The chunked op's second call, through the kept launchers, gives the first's bits, forward
    and backward. A call on another grid (twice the sequences, or packed sequences of other
    lengths) gives the JIT's bits too; the dense op's goes through the kernels kept before."""
    from fla_factmem.ops import chunk_factorization_memory
    from tests.utils import make_inputs, offsets_of, run_with_grads

    launchers = set(op_launches(op))
    monkeypatch.setattr(launch, "DQK_WALK_MAX_V", 1 << 30 if op == "dense-walk" else 0)
    M, topk = (256, None) if op.startswith("dense") else (1024, 16)

    def run(shape, dout=None, dht=None):
        """shape: B rows of 300 tokens, or the lengths of sequences packed in one row."""
        torch.manual_seed(0)
        packed = isinstance(shape, tuple)
        B, T, N = (1, sum(shape), len(shape)) if packed else (shape, 300, shape)
        inputs = make_inputs(B, T, 4, M, 64, dtype=torch.bfloat16, device="cuda", logit_scale=2.0, N=N)
        cu_seqlens = offsets_of(shape, "cuda") if packed else None
        return run_with_grads(chunk_factorization_memory, inputs, topk, dout, dht, cu_seqlens=cu_seqlens)

    def assert_same_bits(a, b):
        for x, y in zip((a[0], a[1], *a[2]), (b[0], b[1], *b[2])):
            assert torch.equal(x, y)

    for launcher in launchers:
        launcher.launchers.clear()
    first_shape = 2 if isinstance(other_shape, int) else (300, 300)
    first = run(first_shape)
    assert all(launcher.launchers for launcher in launchers)
    assert_same_bits(run(first_shape, *first[3:]), first)
    kept = sum(len(launcher.launchers) for launcher in launchers)
    other = run(other_shape)
    if op.startswith("dense"):  # the ints that change (B T H, or none when packed) are multiples of 16 both times
        assert sum(len(launcher.launchers) for launcher in launchers) == kept
    for launcher in launchers:
        launcher.launchers.clear()
    assert_same_bits(run(other_shape, *other[3:]), other)
