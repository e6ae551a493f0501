"""The decode op keeps one launch per kind of call (``fused_recurrent.call_key``): later calls of
that kind skip the checks and the launch's sizing, so the key must separate every call that the
checks or the kernel's compilation would treat differently. On the CPU, the op's CUDA path taken
through the interpreter; on the GPU (``cuda`` marker) the kept launches give the JIT's bits."""

import pytest
import torch

from fla_factmem.ops import fused_recurrent_factorization_memory, naive_factorization_memory
from fla_factmem.ops.factorization_memory import fused_recurrent as fused_recurrent_module
from fla_factmem.ops.factorization_memory import launch
from fla_factmem.ops.factorization_memory.fused_recurrent import call_key
from tests.utils import assert_close, cuda_decode_calls, make_inputs, unaligned


@pytest.fixture
def kept(monkeypatch) -> dict:
    """The op's kept launches, empty, with its Triton paths taken on the CPU tensors (M <= 16)."""
    monkeypatch.setattr(fused_recurrent_module, "runs_dense_triton", lambda v, logits, k, *o: k is None)
    monkeypatch.setattr(fused_recurrent_module, "runs_sparse_triton", lambda v, logits, k, *o: k is not None)
    launches = {}
    monkeypatch.setattr(fused_recurrent_module, "_DECODE_LAUNCHES", launches)
    return launches


def step_inputs(B=3, T=1, H=2, M=16, V=8):
    return [x.detach() for x in make_inputs(B, T, H, M, V)]


@pytest.mark.parametrize("topk", [None, 4])
def test_calls_of_one_kind_share_a_launch_and_match_naive(kept, topk):
    with torch.no_grad():
        for _ in range(3):  # fresh values, one kind of call
            v, logits, eta, mu, h0 = step_inputs()
            o, ht = fused_recurrent_factorization_memory(v, logits, eta, mu, topk, h0, True)
            o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, topk, h0, True)
            assert_close("o", o, o_ref, 1e-5)
            assert_close("final state", ht, ht_ref, 1e-5)
        assert len(kept) == 1
        v, logits, eta, mu, h0 = step_inputs(T=2)
        o, ht = fused_recurrent_factorization_memory(v, logits, eta, mu, topk, h0, True)
        assert len(kept) == 2
        assert_close("o", o, naive_factorization_memory(v, logits, eta, mu, topk, h0)[0], 1e-5)
        # a kept in-place launch writes the state it is given
        state = h0.clone()
        for _ in range(2):
            ref = naive_factorization_memory(v, logits, eta, mu, topk, state, True)[1]
            _, ht = fused_recurrent_factorization_memory(
                v, logits, eta, mu, topk, state, True, inplace_final_state=True
            )
            assert ht is state
            assert_close("final state in place", state, ref, 1e-5)


def test_calls_a_kept_launch_does_not_fit_are_still_checked(kept):
    """After a good call, calls that differ only where the checks or the kernel's compilation
    look get the checks' errors or a path of their own, not the kept launch."""
    v, logits, eta, mu, h0 = step_inputs()
    with torch.no_grad():
        fused_recurrent_factorization_memory(v, logits, eta, mu, 1, h0, True)
        with pytest.raises(TypeError, match="topk"):
            fused_recurrent_factorization_memory(v, logits, eta, mu, True, h0, True)
        with pytest.raises(TypeError, match="eta"):
            fused_recurrent_factorization_memory(v, logits, eta.int(), mu, 1, h0, True)
        with pytest.raises(ValueError, match="contiguous"):
            state = torch.randn(3, 2, 8, 16).transpose(-1, -2)  # h0's shape, other strides
            fused_recurrent_factorization_memory(v, logits, eta, mu, 1, state, True, inplace_final_state=True)
        assert len(kept) == 1
    # with autograd, the PyTorch loop (the kernel has no backward)
    o, _ = fused_recurrent_factorization_memory(v, logits.requires_grad_(), eta, mu, 1, h0, True)
    assert o.grad_fn is not None and len(kept) == 1


def test_call_key_separates_what_the_kernel_compiles_differently():
    v, logits, eta, mu, h0 = step_inputs()
    key = call_key(v, logits, eta, mu, 4, h0, True, None, False)
    v2, logits2, eta2, mu2, h02 = step_inputs()  # other values, the same kind
    assert key == call_key(v2, logits2, eta2, mu2, 4, h02, True, None, False)
    assert key != call_key(unaligned(v), logits, eta, mu, 4, h0, True, None, False)
    wider = torch.randn(3, 1, 2, 20)[..., :16]  # logits' shape, other strides
    assert key != call_key(v, wider, eta, mu, 4, h0, True, None, False)
    assert key != call_key(v, logits, eta, mu, 4, h0, True, torch.tensor([0, 1, 2, 3]), False)
    with torch.no_grad():
        assert key != call_key(v, logits, eta, mu, 4, h0, True, None, False)
    assert call_key(v, logits, eta, mu, True, h0, True, None, False) is None
    assert call_key(torch.nn.Parameter(v), logits, eta, mu, 4, h0, True, None, False) is None
    assert call_key(v.to_sparse(), logits, eta, mu, 4, h0, True, None, False) is None


@pytest.mark.cuda
@pytest.mark.parametrize("topk", [None, 16])
def test_cuda_kept_decode_launches_match_fresh_ones(topk, monkeypatch):
    """The public op's second call of a kind runs its kept launch: the same bits as a fresh
    launch through the JIT's keys, for aligned, unaligned and varlen calls."""
    monkeypatch.setattr(fused_recurrent_module, "_DECODE_LAUNCHES", {})
    calls, h0, o_ref, ht_ref = cuda_decode_calls(topk)
    with torch.no_grad():
        for n, (*args, cu_seqlens) in enumerate(calls, 1):
            o_fresh, ht_fresh = launch.fused_recurrent_fwd(*args, h0, True, cu_seqlens, topk)
            for _ in range(2):
                o, ht = fused_recurrent_factorization_memory(*args, topk, h0, True, cu_seqlens)
                assert torch.equal(o, o_fresh) and torch.equal(ht, ht_fresh)
            assert_close("o", o.reshape(o_ref.shape), o_ref, 1e-2)
            assert_close("final state", ht, ht_ref, 1e-5)
            state = h0.clone()
            for _ in range(2):  # in place, twice from the same start
                state.copy_(h0)
                fused_recurrent_factorization_memory(*args, topk, state, False, cu_seqlens, inplace_final_state=True)
                assert torch.equal(state, ht_fresh)
            assert len(fused_recurrent_module._DECODE_LAUNCHES) == 2 * n  # returning the state, and in place
