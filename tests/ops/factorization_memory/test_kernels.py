"""The dense Triton kernels against the definition: on the CPU through TRITON_INTERPRET=1 at
small shapes (half inputs too, with float32 dots there), on the GPU (``cuda`` marker) at real
shapes and in bf16 and fp16."""

import pytest
import torch
import triton

from fla_factmem.ops import chunk_factorization_memory, fused_recurrent_factorization_memory, naive_factorization_memory
from fla_factmem.ops.factorization_memory import launch
from fla_factmem.ops.factorization_memory.chunk import ChunkFactorizationMemoryFunction
from fla_factmem.ops.factorization_memory.chunk_torch import chunk_factorization_memory_torch
from fla_factmem.ops.factorization_memory.launch import chunk_fwd, fused_recurrent_fwd
from fla_factmem.ops.factorization_memory.routing import run_on_weights
from fla_factmem.utils import cdiv, next_power_of_2
from tests.utils import GRAD_NAMES, assert_close, assert_matches, make_inputs, run_with_grads


def chunk_kernels_forward(*args):
    return chunk_fwd(*args)[:2]


KERNELS = [chunk_kernels_forward, fused_recurrent_fwd]


@pytest.fixture(params=["walk", "levels"])
def dqk_form(request, monkeypatch):
    """The backward's dq/dk kernel in both forms (``launch.dqk_walks``), whatever V."""
    monkeypatch.setattr(launch, "DQK_WALK_MAX_V", 1 << 30 if request.param == "walk" else 0)
    return request.param


def triton_chunk(v, logits, eta, mu, topk=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """The Triton forward and backward kernels on any device (the public op takes them on CUDA only)."""
    assert topk is None
    return ChunkFactorizationMemoryFunction.apply(v, logits, eta, mu, initial_state, output_final_state, cu_seqlens)


def float64_reference(v, logits, eta, mu, h0, cu_seqlens=None):
    """The PyTorch chunked path in float64: exact enough to judge float32 kernels."""
    args = [x.detach().double() if x is not None else None for x in (v, logits, eta, mu, h0)]
    return run_on_weights(chunk_factorization_memory_torch, *args[:4], None, args[4], True, cu_seqlens)


def edge_case_inputs(case, B, T, H, M, V, device):
    """Inputs of SPEC section 3's edge cases: theta = 1 with one-hot routing ("overwrite"),
    eta = 0, logit differences of ~50 ("near_one_hot"), theta just below 1 ("saturating": logit
    differences of ~20 and eta in [0.9, 1]), all logits near 1e4 ("offset": softmax does not
    depend on it, so neither may the kernels), each token's top logit 8 to 16 above its others
    ("top_gap": alpha = 1 - 1e-3 to 1 - 1e-7, where the softmax backward of the top row cancels
    unless computed from the others'); anything else is plain random. Leaves that require grad."""
    v, logits, eta, mu, h0 = (x.detach() for x in make_inputs(B, T, H, M, V, device=device))
    if case == "overwrite":
        logits = torch.nn.functional.one_hot(torch.randint(M, (B, T, H), device=device), M) * 1000.0
        eta = torch.ones_like(eta)
    elif case == "eta_zero":
        eta = torch.zeros_like(eta)
    elif case == "near_one_hot":
        logits = torch.randn(B, T, H, M, device=device) * 50
    elif case == "saturating":
        logits = torch.randn(B, T, H, M, device=device) * 20
        eta = 0.9 + 0.1 * torch.rand_like(eta)
    elif case == "offset":
        logits = torch.randn(B, T, H, M, device=device) * 2 + 1e4
    elif case == "top_gap":
        top = torch.nn.functional.one_hot(torch.randint(M, (B, T, H), device=device), M)
        logits = torch.randn(B, T, H, M, device=device) * 0.1 + top * (8 + 8 * torch.rand(B, T, H, 1, device=device))
    return tuple(x.float().requires_grad_() for x in (v, logits, eta, mu, h0))


def test_host_block_sizes_match_triton():
    """The launches' plain-Python next_power_of_2 and cdiv agree with Triton's (slower) ones."""
    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 16, 64):
            assert cdiv(n, d) == triton.cdiv(n, d)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(
    ("B", "T", "H", "M", "V"),
    [(2, 1, 2, 16, 16), (2, 37, 2, 16, 16), (1, 33, 1, 24, 20), (1, 40, 2, 128, 32)],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_kernel_matches_definition(kernel, B, T, H, M, V, with_state):
    v, logits, eta, mu, h0 = (
        x.detach() if x is not None else None
        for x in make_inputs(B, T, H, M, V, logit_scale=2.0, with_state=with_state)
    )
    o, ht = kernel(v, logits, eta, mu, h0, True, None)
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, None, h0, True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_varlen(kernel):
    offsets = torch.tensor([0, 18, 18, 19, 50], dtype=torch.int32)
    v, logits, eta, mu, h0 = (x.detach() for x in make_inputs(1, 50, 2, 16, 16, N=4))
    o, ht = kernel(v, logits, eta, mu, h0, True, offsets)
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, None, h0, True, cu_seqlens=offsets)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


def test_forward_without_scores_for_backward():
    """Without a backward to come (no_grad prefill) the forward skips storing the scores A."""
    v, logits, eta, mu, h0 = (x.detach() for x in make_inputs(1, 40, 2, 16, 16, with_state=True))
    o, ht, saved = chunk_fwd(v, logits, eta, mu, h0, True, None, False)
    assert saved.scores is None
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, None, h0, True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.parametrize("T", [1, 5])
def test_dense_decode_in_place(T):
    """The decode kernel writes the final state over the initial one: each program reads its
    block of the state whole before writing it."""
    v, logits, eta, mu, h0 = (x.detach() for x in make_inputs(2, T, 2, 24, 20, logit_scale=2.0, with_state=True))
    state = h0.clone()
    o, ht = fused_recurrent_fwd(v, logits, eta, mu, state, True, None, inplace_final_state=True)
    assert ht is state
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, None, h0, True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["overwrite", "eta_zero", "near_one_hot", "offset"])
def test_kernel_edge_numerics(kernel, case):
    v, logits, eta, mu, h0 = (x.detach() for x in edge_case_inputs(case, 1, 40, 2, 16, 16, "cpu"))
    o, ht = kernel(v, logits, eta, mu, h0, True, None)
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, None, h0, True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.usefixtures("dqk_form")
@pytest.mark.parametrize(
    ("B", "T", "H", "M", "V"),
    # T = 1; a partial chunk; M and V not powers of two; several chunks, several blocks of M rows;
    # V over several of the dq/dk kernel's blocks of 16 columns (at V = 20 the last one partly
    # masked); M and V below the 16 of Triton's smallest dot, in blocks of 16 (launch.dot_block)
    [
        (2, 1, 2, 16, 16),
        (1, 37, 2, 16, 16),
        (1, 70, 1, 24, 20),
        (1, 130, 1, 80, 16),
        (1, 37, 1, 16, 80),
        (1, 37, 2, 4, 8),
        (1, 9, 1, 1, 2),
    ],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_kernels_gradients(B, T, H, M, V, with_state):
    inputs = make_inputs(B, T, H, M, V, logit_scale=2.0, with_state=with_state)
    assert_matches(triton_chunk, naive_factorization_memory, inputs, None, 1e-5, 1e-4)


def test_walk_slices_divide_the_columns():
    for V in range(1, 1025):
        BV = next_power_of_2(V)
        for state_bytes in (2, 4):
            slices = launch.walk_slices(BV, state_bytes)
            assert slices >= 1 and BV % slices == 0, (V, state_bytes, slices)
    assert (launch.walk_slices(64, 2), launch.walk_slices(64, 4), launch.walk_slices(32, 4)) == (1, 2, 1)


@pytest.mark.parametrize("slices", [2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_walk_column_slices(slices, dtype, monkeypatch):
    """The dq/dk walk with its columns in slices (``launch.walk_slices``) that its inputs would
    not get: V = 24 of 32 columns, at 8 slices two of them wholly masked; two blocks of rows;
    packed sequences, one empty and one of a token; float32 and bf16 chunk states."""
    monkeypatch.setattr(launch, "DQK_WALK_MAX_V", 1 << 30)
    monkeypatch.setattr(launch, "walk_slices", lambda BV, state_bytes: slices)
    offsets = torch.tensor([0, 18, 18, 19, 70], dtype=torch.int32)
    inputs = make_inputs(1, 70, 2, 40, 24, dtype=dtype, logit_scale=2.0, N=4)
    if dtype == torch.float32:
        assert_matches(triton_chunk, naive_factorization_memory, inputs, None, 1e-5, 1e-4, cu_seqlens=offsets)
    else:
        assert_matches_float64(triton_chunk, inputs, 1e-2, 1e-2, cu_seqlens=offsets)


@pytest.mark.usefixtures("dqk_form")
def test_chunk_kernels_gradients_varlen():
    offsets = torch.tensor([0, 18, 18, 19, 90], dtype=torch.int32)
    inputs = make_inputs(1, 90, 2, 16, 16, N=4)
    assert_matches(triton_chunk, naive_factorization_memory, inputs, None, 1e-5, 1e-4, cu_seqlens=offsets)


@pytest.mark.usefixtures("dqk_form")
@pytest.mark.parametrize(
    ("case", "M"),
    # M = 80: the dominant rows fall in every block of rows
    [
        ("overwrite", 16),
        ("eta_zero", 16),
        ("near_one_hot", 16),
        ("near_one_hot", 80),
        ("saturating", 16),
        ("saturating", 80),
        ("overwrite", 80),
        ("offset", 16),
        ("offset", 80),
        ("top_gap", 16),
        ("top_gap", 80),
    ],
)
def test_chunk_kernels_gradients_edge_numerics(case, M):
    # against float64: the naive op's float32 autograd loses the top row's gradient under "top_gap"
    inputs = edge_case_inputs(case, 1, 80, 1, M, 16, "cpu")
    assert_matches_float64(triton_chunk, inputs, 1e-5, 1e-4)


# ---------------------------------------------------------------- GPU, real shapes

CUDA_SHAPES = [
    (2, 1000, 4, 64, 64),
    (2, 300, 2, 4, 8),
    (1, 2049, 2, 256, 64),
    (2, 300, 2, 16, 32),
    (1, 500, 2, 100, 128),
    (1, 300, 2, 64, 256),
    (1, 257, 1, 32, 256),
]


def assert_matches_float64(fn, inputs, fwd_tol, bwd_tol, cu_seqlens=None, topk=None):
    """``fn``'s output, final state and input gradients against the PyTorch chunked path in float64."""
    o, ht, grads, dout, dht = run_with_grads(fn, inputs, topk, cu_seqlens=cu_seqlens)
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in inputs]
    o_ref, ht_ref = run_on_weights(chunk_factorization_memory_torch, *leaves[:4], topk, leaves[4], True, cu_seqlens)
    wanted = [x for x in leaves if x is not None]
    found = iter(torch.autograd.grad((o_ref, ht_ref), wanted, (dout.double(), dht.double())))
    assert o.dtype == inputs[0].dtype and ht.dtype == torch.float32
    assert_close("o", o, o_ref, fwd_tol)
    assert_close("final state", ht, ht_ref, fwd_tol)
    for name, x, g in zip(GRAD_NAMES, inputs, grads):
        if x is not None:
            assert g.dtype == x.dtype, f"{name}: dtype {g.dtype} != {x.dtype}"
            assert_close(name, g, next(found), bwd_tol)


GRAD_TOLERANCES = [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-2, 1e-2), (torch.float16, 1e-2, 1e-2)]


@pytest.mark.usefixtures("dqk_form")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_kernels_half_inputs(dtype):
    """Half inputs through the kernels: their loads, the chunk states (bf16 for bf16 inputs:
    launch.chunk_state_dtype) and the outputs and gradients stored in the inputs' dtype; four
    chunks, the last partial. The interpreter keeps every dot in float32 (launch.dot_precision);
    the bf16 products of the GPU path are tested by the cuda tests."""
    inputs = make_inputs(1, 110, 2, 24, 20, dtype=dtype, logit_scale=2.0)
    assert_matches_float64(triton_chunk, inputs, 1e-2, 1e-2)


@pytest.mark.usefixtures("dqk_form")
def test_chunk_kernels_fp16_gradient_states_past_fp16_range():
    """fp16 inputs under loss scaling (do = 300): with slow decays (eta = 0.002, mostly one row)
    the gradient on the memory grows to about |do| mu / eta, 8e4 here, past fp16's 65504, while
    every gradient stays within it. Each must come out finite and right: fp16 inputs keep float32
    chunk states (fp16 ones gave an infinite dv: benchmarks/ops/NOTES.md, session 35)."""
    B, T, H, M, V = 1, 512, 1, 16, 16
    v = (torch.randn(B, T, H, V) / 64).to(torch.float16)
    logits = torch.nn.functional.one_hot(torch.zeros(B, T, H, dtype=torch.long), M).to(torch.float16) * 4
    eta = torch.full((B, T, H), 0.002, dtype=torch.float16)
    mu = torch.ones(B, T, H, dtype=torch.float16)
    h0 = torch.randn(B, H, M, V) / 64
    inputs = [x.requires_grad_() for x in (v, logits, eta, mu, h0)]
    dout = torch.full((B, T, H, V), 300.0, dtype=torch.float16)
    _, _, grads, _, dht = run_with_grads(triton_chunk, inputs, None, dout=dout)
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    o_ref, ht_ref = run_on_weights(chunk_factorization_memory_torch, *leaves[:4], None, leaves[4], True, None)
    found = torch.autograd.grad((o_ref, ht_ref), leaves, (dout.double(), dht.double()))
    assert found[4].abs().max() > 65504
    for name, g, ref in zip(GRAD_NAMES, grads, found):
        assert_close(name, g, ref, 1e-2)


@pytest.mark.usefixtures("dqk_form")
@pytest.mark.cuda
@pytest.mark.parametrize(("B", "T", "H", "M", "V"), CUDA_SHAPES)
@pytest.mark.parametrize(("dtype", "fwd_tol", "bwd_tol"), GRAD_TOLERANCES)
def test_cuda_chunk_backward(B, T, H, M, V, dtype, fwd_tol, bwd_tol):
    inputs = make_inputs(B, T, H, M, V, dtype=dtype, device="cuda", logit_scale=2.0)
    assert_matches_float64(chunk_factorization_memory, inputs, fwd_tol, bwd_tol)


@pytest.mark.usefixtures("dqk_form")
@pytest.mark.cuda
def test_cuda_varlen_and_states():
    offsets = torch.tensor([0, 700, 701, 701, 2000, 2100], device="cuda")
    inputs = make_inputs(1, 2100, 4, 64, 64, device="cuda", N=5)
    assert_matches_float64(chunk_factorization_memory, inputs, 1e-5, 1e-4, cu_seqlens=offsets)
    v, logits, eta, mu, h0 = (x.detach() for x in inputs)
    o, ht = fused_recurrent_factorization_memory(v, logits, eta, mu, None, h0, True, cu_seqlens=offsets)
    o_ref, ht_ref = float64_reference(v, logits, eta, mu, h0, offsets)
    assert_close("fused_recurrent o", o, o_ref, 1e-5)
    assert_close("fused_recurrent final state", ht, ht_ref, 1e-5)


@pytest.mark.usefixtures("dqk_form")
@pytest.mark.cuda
@pytest.mark.parametrize("case", ["overwrite", "eta_zero", "near_one_hot", "saturating", "offset", "top_gap"])
def test_cuda_edge_numerics(case):
    inputs = edge_case_inputs(case, 1, 4096, 2, 64, 64, "cuda")
    assert_matches_float64(chunk_factorization_memory, inputs, 1e-5, 1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("num_warps", "block_m", "slices"),
    [(w, m, None) for w in (1, 2, 4, 8) for m in (16, 32)] + [(1, 32, 2), (1, 32, 4), (4, 32, 2), (8, 16, 4)],
)
def test_cuda_walk_launches(num_warps, block_m, slices, monkeypatch):
    """The dq/dk walk at launches other than its default (its rows over several warps, where
    dalpha overwrites dphi in place; its columns in slices other than its pick), against the
    levels' gradients."""
    if slices is not None:
        monkeypatch.setattr(launch, "walk_slices", lambda BV, state_bytes: slices)
    v, logits, eta, mu, h0 = (x.detach() for x in make_inputs(2, 300, 2, 256, 64, device="cuda", logit_scale=2.0))
    do = torch.randn_like(v)
    _, _, saved = chunk_fwd(v, logits, eta, mu, h0, False, None)
    found = launch.chunk_bwd(v, logits, eta, mu, saved, do, None, None, True, block_m, num_warps, walk=True)
    wanted = launch.chunk_bwd(v, logits, eta, mu, saved, do, None, None, True, walk=False)
    for name, g, ref in zip(GRAD_NAMES, found, wanted):
        assert_close(name, g, ref, 1e-4)


@pytest.mark.cuda
def test_cuda_long_sequence():
    inputs = edge_case_inputs("long", 1, 200_000, 1, 64, 64, "cuda")
    o, ht, grads, _, _ = run_with_grads(chunk_factorization_memory, inputs, None)
    for name, g in zip(GRAD_NAMES, grads):
        assert torch.isfinite(g).all(), f"{name}: NaN or Inf"
    o_ref, ht_ref = float64_reference(*inputs)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_decode(T, dtype, tol, inplace):
    v, logits, eta, mu, h0 = (x.detach() for x in make_inputs(64, T, 8, 256, 64, dtype=dtype, device="cuda"))
    state = h0.clone()
    version = state._version
    o, ht = fused_recurrent_factorization_memory(v, logits, eta, mu, None, state, True, inplace_final_state=inplace)
    assert (ht is state) == inplace
    assert (state._version > version) == inplace, "autograd must see the in-place write"
    o_ref, ht_ref = float64_reference(v, logits, eta, mu, h0)
    assert_close("o", o, o_ref, tol)
    assert_close("final state", ht, ht_ref, tol)
