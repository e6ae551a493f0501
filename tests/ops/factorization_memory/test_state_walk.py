"""The one-pass walk to the chunk states (``chunk_state_walk_kernel``) against the increments and
the scan: the same states and far ends, both directions, with packed sequences, initial states,
partial chunks and bf16 states; and the dense op's gradients through it."""

from types import SimpleNamespace

import pytest
import torch

from fla_factmem.ops.factorization_memory import launch
from fla_factmem.ops.factorization_memory.launch import (
    chunk_bwd,
    chunk_fwd,
    chunk_layout,
    chunk_states,
    logsumexp,
    walk_fills_gpu,
)
from tests.utils import GRAD_NAMES, assert_close, make_inputs

CASES = [  # B, T, H, M, V, cu_seqlens
    (2, 1, 2, 16, 16, None),
    (2, 70, 2, 24, 20, None),
    (1, 50, 2, 16, 16, [0, 18, 18, 19, 50]),
    (1, 40, 1, 128, 32, None),
    (1, 80, 2, 40, 80, None),  # several blocks of columns (64 or 32 of them a program)
]


def states_both_ways(B, T, H, M, V, offsets, dtype, reverse, device, start=True, store_end=True):
    N = len(offsets) - 1 if offsets else None
    v, logits, eta, mu, h0 = (
        x.detach() for x in make_inputs(B, T, H, M, V, dtype=dtype, device=device, logit_scale=2.0, N=N)
    )
    cu_seqlens = torch.tensor(offsets, device=device) if offsets else None
    lse, _ = logsumexp(logits, eta)
    layout = chunk_layout(B, T, cu_seqlens)
    h0 = h0 if start else None
    return [
        chunk_states(v, logits, lse, eta, mu, h0, store_end, layout, cu_seqlens, N or B, reverse, walk=walk)
        for walk in (True, False)
    ]


@pytest.mark.parametrize(("B", "T", "H", "M", "V", "offsets"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
def test_walk_matches_increments_and_scan(B, T, H, M, V, offsets, dtype, reverse):
    (states, end), (states_ref, end_ref) = states_both_ways(B, T, H, M, V, offsets, dtype, reverse, "cpu")
    assert states.dtype == states_ref.dtype and end.dtype == torch.float32
    # bf16 states round float32 ones that may differ in their last bits (the two ways' products
    # are over blocks of other sizes), and a rounding may then go the other way: at most one bf16
    # ulp, 2^-8 of the value
    assert_close("states", states.float(), states_ref.float(), 1e-6 if dtype == torch.float32 else 2**-8)
    assert_close("far end", end, end_ref, 1e-6)


@pytest.mark.parametrize(("start", "store_end"), [(False, True), (True, False), (False, False)])
def test_walk_without_start_or_far_end(start, store_end):
    (states, end), (states_ref, end_ref) = states_both_ways(
        1, 45, 2, 16, 16, None, torch.float32, False, "cpu", start, store_end
    )
    assert_close("states", states, states_ref, 1e-6)
    assert (end is None) == (end_ref is None) == (not store_end)
    if store_end:
        assert_close("far end", end, end_ref, 1e-6)


def test_walk_rule_refuses_packed_cpu_and_interpreted_calls(monkeypatch):
    """The rule on a stand-in for a CUDA tensor (one SM): it takes the walk there, and refuses
    packed sequences, interpreted kernels, CPU tensors and, in reverse, more than 64 columns."""
    monkeypatch.setattr(launch, "multiprocessor_count", lambda index: 1)
    monkeypatch.setattr(launch, "INTERPRETED", False)
    on_gpu = SimpleNamespace(device=torch.device("cuda", 0), shape=(1, 1, 1, 64))
    wide = SimpleNamespace(device=torch.device("cuda", 0), shape=(1, 1, 1, 128))
    for reverse in (False, True):
        assert walk_fills_gpu(3, on_gpu, None, reverse)
        assert not walk_fills_gpu(3, on_gpu, torch.tensor([0, 1]), reverse)
        assert not walk_fills_gpu(3, torch.zeros(1, 1, 1, 64), None, reverse)
    assert walk_fills_gpu(3, wide, None, False) and not walk_fills_gpu(3, wide, None, True)
    monkeypatch.setattr(launch, "INTERPRETED", True)
    assert not walk_fills_gpu(3, on_gpu, None, False)


@pytest.mark.cuda
def test_cuda_walk_needs_three_programs_per_sm_and_at_most_64_columns_in_reverse():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    narrow, wide = torch.zeros(1, 1, 1, 64, device="cuda"), torch.zeros(1, 1, 1, 256, device="cuda")
    assert walk_fills_gpu(3 * sms, narrow, None, False) and walk_fills_gpu(3 * sms, narrow, None, True)
    assert not walk_fills_gpu(3 * sms - 1, narrow, None, False)
    assert walk_fills_gpu(3 * sms, wide, None, False) and not walk_fills_gpu(3 * sms, wide, None, True)


def assert_op_matches_the_two_kernels(inputs, offsets, tol, state_walk):
    """The dense forward and backward (outputs, final state, gradients) with ``state_walk`` (the
    walk, or None for the rule's choice) against those through the two kernels."""
    v, logits, eta, mu, h0 = inputs
    do, dht = torch.randn_like(v), torch.randn_like(h0)

    def run(walk):
        o, ht, saved = chunk_fwd(v, logits, eta, mu, h0, True, offsets, state_walk=walk)
        return (o, ht, *chunk_bwd(v, logits, eta, mu, saved, do, dht, offsets, True, state_walk=walk))

    for name, x, ref in zip(("o", "final state", *GRAD_NAMES), run(state_walk), run(False)):
        assert_close(name, x.float(), ref.float(), tol)


def test_op_gradients_match_either_way():
    """The dense forward and backward with the walk to the states, against the two kernels."""
    inputs = [x.detach() for x in make_inputs(1, 70, 2, 16, 16, logit_scale=2.0, N=4)]
    assert_op_matches_the_two_kernels(inputs, torch.tensor([0, 18, 18, 19, 70]), 1e-6, True)


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("B", "T", "H", "M", "V", "offsets"), [(4, 4096, 8, 256, 64, None), (1, 5000, 4, 64, 64, [0, 700, 701, 4000, 5000])]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_walk_matches_increments_and_scan(B, T, H, M, V, offsets, dtype, reverse):
    (states, end), (states_ref, end_ref) = states_both_ways(B, T, H, M, V, offsets, dtype, reverse, "cuda")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close("states", states.float(), states_ref.float(), tol)
    # the far end is float32 either way, but with half inputs the products are tf32 dots (ieee
    # ones for float32 inputs and interpreted kernels), and the two ways' far ends differ by more
    # than float32's precision: 2.1e-5 of the norm once on an H100 (session 48). The bound is
    # tf32's unit roundoff.
    assert_close("far end", end, end_ref, 1e-5 if dtype == torch.float32 else 2**-11)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_op_takes_the_walk_by_default_and_matches_the_two_kernels(dtype, monkeypatch):
    """At the benchmark's shape the rule takes the walk both ways (on a GPU of at most 170 SMs);
    the op's outputs and gradients then match those through the two kernels."""
    taken, rule = [], launch.walk_fills_gpu

    def recorded_rule(*args):
        taken.append(rule(*args))
        return taken[-1]

    monkeypatch.setattr(launch, "walk_fills_gpu", recorded_rule)
    inputs = [x.detach() for x in make_inputs(4, 4096, 8, 256, 64, dtype, "cuda", 2.0)]
    assert_op_matches_the_two_kernels(inputs, None, 1e-5 if dtype == torch.float32 else 1e-2, None)
    assert taken == [True, True]
