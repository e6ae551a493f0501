"""No Triton kernel of the op loads or stores outside its tensors: run by the interpreter on the
CPU, every lane that a mask lets through must fall in the storage of one of the kernel's tensor
arguments (tests/interpreter_bounds.py). tests/conftest.py checks this around every test; these
cases put every kernel's masks at their edges at once: packed sequences with an empty and a
one-token one, sequences shorter than a chunk and not a multiple of it, M and V not powers of 2
with M over one block of rows, initial and final states, gradients on both."""

import os

import pytest
import torch
import triton
import triton.language as tl

from fla_factmem.ops.factorization_memory import launch
from fla_factmem.ops.factorization_memory.launch import fused_recurrent_fwd
from tests.interpreter_bounds import MISSING_HOOKS, out_of_bounds_lanes
from tests.ops.factorization_memory.test_kernels import triton_chunk
from tests.ops.factorization_memory.test_sparse_kernels import triton_sparse_chunk
from tests.utils import make_inputs, offsets_of, run_with_grads

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter's lanes"),
    pytest.mark.skipif(bool(MISSING_HOOKS), reason=f"this Triton's interpreter lacks {MISSING_HOOKS}"),
]

# an empty sequence, one of one token, one shorter than a chunk, one past a chunk
LENGTHS = [0, 1, 18, 37]
M, V, H = 40, 24, 2


def packed_inputs():
    cu_seqlens = offsets_of(LENGTHS)
    return make_inputs(1, int(cu_seqlens[-1]), H, M, V, N=len(LENGTHS)), cu_seqlens


@pytest.mark.parametrize("walk", [True, False])
def test_dense_chunk_kernels_stay_in_bounds(walk, monkeypatch):
    """The forward and both forms of the backward's dq/dk kernel (``launch.dqk_walks``)."""
    monkeypatch.setattr(launch, "DQK_WALK_MAX_V", 1 << 30 if walk else 0)
    inputs, cu_seqlens = packed_inputs()
    with out_of_bounds_lanes() as lanes:
        run_with_grads(triton_chunk, inputs, None, cu_seqlens=cu_seqlens)
    assert not lanes


@pytest.mark.parametrize("reverse", [False, True])
def test_state_walk_stays_in_bounds(reverse):
    """The one-pass walk over chunks, forced (``launch.walk_fills_gpu`` refuses packed sequences)."""
    (v, logits, eta, mu, h0), cu_seqlens = packed_inputs()
    v, logits, eta, mu, h0 = (x.detach() for x in (v, logits, eta, mu, h0))
    lse, _ = launch.logsumexp(logits, eta)
    layout = launch.chunk_layout(1, v.shape[1], cu_seqlens)
    with out_of_bounds_lanes() as lanes:
        launch.chunk_states(v, logits, lse, eta, mu, h0, True, layout, cu_seqlens, len(LENGTHS), reverse, walk=True)
    assert not lanes


def test_sparse_chunk_kernels_stay_in_bounds():
    inputs, cu_seqlens = packed_inputs()
    with out_of_bounds_lanes() as lanes:
        run_with_grads(triton_sparse_chunk, inputs, 3, cu_seqlens=cu_seqlens)
    assert not lanes


@pytest.mark.parametrize("topk", [None, 3])
def test_decode_kernels_stay_in_bounds(topk):
    (v, logits, eta, mu, h0), cu_seqlens = packed_inputs()
    with torch.no_grad(), out_of_bounds_lanes() as lanes:
        fused_recurrent_fwd(v, logits, eta, mu, h0, True, cu_seqlens, topk)
    assert not lanes


@pytest.mark.out_of_bounds
def test_the_check_sees_a_lane_out_of_bounds():
    """The check itself: a kernel that loads one element past its tensor is caught."""

    @triton.jit
    def read_past_end(x, y, n):
        offsets = tl.arange(0, 8)
        tl.store(y + offsets, tl.load(x + offsets, mask=offsets < n + 1), mask=offsets < n)

    x, y = torch.zeros(4), torch.zeros(4)
    with out_of_bounds_lanes() as lanes:
        read_past_end[(1,)](x, y, 4)
    assert lanes == {("read_past_end", "load"): 1}
