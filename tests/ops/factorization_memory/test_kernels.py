"""The dense Triton kernels against the definition: on the CPU through TRITON_INTERPRET=1 at
small shapes, on the GPU (``cuda`` marker) at real shapes and in bf16."""

import pytest
import torch

from fla_factmem.ops import chunk_factorization_memory, fused_recurrent_factorization_memory, naive_factorization_memory
from fla_factmem.ops.factorization_memory.chunk_torch import chunk_factorization_memory_torch
from fla_factmem.ops.factorization_memory.launch import chunk_fwd, fused_recurrent_fwd
from fla_factmem.ops.factorization_memory.routing import run_on_weights
from tests.utils import assert_close, assert_matches, make_inputs

KERNELS = [chunk_fwd, fused_recurrent_fwd]


def float64_reference(v, logits, eta, mu, h0, cu_seqlens=None):
    """The PyTorch chunked path in float64: exact enough to judge float32 kernels."""
    args = [x.detach().double() if x is not None else None for x in (v, logits, eta, mu, h0)]
    return run_on_weights(chunk_factorization_memory_torch, *args[:4], None, args[4], True, cu_seqlens)


def edge_case_inputs(case, B, T, H, M, V, device):
    """Inputs of SPEC section 3's edge cases: theta = 1 with one-hot routing ("overwrite"),
    eta = 0, logit differences of ~50 ("near_one_hot"); anything else is plain random."""
    v, logits, eta, mu, h0 = (x.detach() for x in make_inputs(B, T, H, M, V, device=device))
    if case == "overwrite":
        logits = torch.nn.functional.one_hot(torch.randint(M, (B, T, H), device=device), M) * 1000.0
        eta = torch.ones_like(eta)
    elif case == "eta_zero":
        eta = torch.zeros_like(eta)
    elif case == "near_one_hot":
        logits = torch.randn(B, T, H, M, device=device) * 50
    return v, logits, eta, mu, h0


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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["overwrite", "eta_zero", "near_one_hot"])
def test_kernel_edge_numerics(kernel, case):
    v, logits, eta, mu, h0 = edge_case_inputs(case, 1, 40, 2, 16, 16, "cpu")
    o, ht = kernel(v, logits, eta, mu, h0, True, None)
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, None, h0, True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


# ---------------------------------------------------------------- GPU, real shapes

CUDA_SHAPES = [
    (2, 1000, 4, 64, 64),
    (1, 2049, 2, 256, 64),
    (2, 300, 2, 16, 32),
    (1, 500, 2, 100, 128),
    (1, 257, 1, 32, 256),
]


@pytest.mark.cuda
@pytest.mark.parametrize(("B", "T", "H", "M", "V"), CUDA_SHAPES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_cuda_chunk_forward(B, T, H, M, V, dtype, tol):
    v, logits, eta, mu, h0 = make_inputs(B, T, H, M, V, dtype=dtype, device="cuda", logit_scale=2.0)
    o, ht = chunk_factorization_memory(v, logits, eta, mu, None, h0, True)
    o_ref, ht_ref = float64_reference(v, logits, eta, mu, h0)
    assert o.dtype == dtype and ht.dtype == torch.float32
    assert_close("o", o, o_ref, tol)
    assert_close("final state", ht, ht_ref, tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_chunk_backward(dtype):
    inputs = make_inputs(2, 300, 2, 64, 64, dtype=dtype, device="cuda")
    tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 1e-2)
    assert_matches(chunk_factorization_memory, naive_factorization_memory, inputs, None, *tol)


@pytest.mark.cuda
def test_cuda_varlen_and_states():
    offsets = torch.tensor([0, 700, 701, 701, 2000, 2100], device="cuda")
    v, logits, eta, mu, h0 = make_inputs(1, 2100, 4, 64, 64, device="cuda", N=5)
    for fn in (chunk_factorization_memory, fused_recurrent_factorization_memory):
        with torch.no_grad():
            o, ht = fn(v, logits, eta, mu, None, h0, True, cu_seqlens=offsets)
        o_ref, ht_ref = float64_reference(v, logits, eta, mu, h0, offsets)
        assert_close(f"{fn.__name__} o", o, o_ref, 1e-5)
        assert_close(f"{fn.__name__} final state", ht, ht_ref, 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["overwrite", "eta_zero", "near_one_hot", "long"])
def test_cuda_edge_numerics(case):
    T, H = (200_000, 1) if case == "long" else (4096, 2)
    v, logits, eta, mu, h0 = edge_case_inputs(case, 1, T, H, 64, 64, "cuda")
    o, ht = chunk_factorization_memory(v, logits, eta, mu, None, h0, True)
    o_ref, ht_ref = float64_reference(v, logits, eta, mu, h0)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_decode(T, dtype, tol):
    v, logits, eta, mu, h0 = (x.detach() for x in make_inputs(64, T, 8, 256, 64, dtype=dtype, device="cuda"))
    o, ht = fused_recurrent_factorization_memory(v, logits, eta, mu, None, h0, True)
    o_ref, ht_ref = float64_reference(v, logits, eta, mu, h0)
    assert_close("o", o, o_ref, tol)
    assert_close("final state", ht, ht_ref, tol)
