"""The chunked op against the naive recurrence (CPU PyTorch path)."""

import pytest
import torch

from fla_factmem.ops import chunk_factorization_memory, naive_factorization_memory
from tests.utils import assert_close, assert_matches, make_inputs, offsets_of, run_with_grads

FWD_TOL, BWD_TOL = 1e-5, 1e-4


@pytest.mark.parametrize(
    ("B", "T", "H", "M", "V", "topk", "chunk_size"),
    [
        (2, 1, 2, 8, 4, None, 16),  # T = 1
        (2, 37, 2, 8, 4, None, 16),  # T not a multiple of the chunk
        (1, 64, 3, 16, 8, None, 16),
        (2, 50, 2, 16, 8, 1, 16),  # K = 1
        (2, 50, 2, 16, 8, 4, 8),
        (2, 50, 2, 16, 8, 16, 16),  # K = M
        (1, 100, 1, 1, 4, None, 32),  # M = 1
        (1, 33, 2, 32, 16, 8, 64),  # one partial chunk
    ],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_matches_naive(B, T, H, M, V, topk, chunk_size, with_state):
    inputs = make_inputs(B, T, H, M, V, logit_scale=2.0, with_state=with_state)
    assert_matches(
        chunk_factorization_memory, naive_factorization_memory, inputs, topk, FWD_TOL, BWD_TOL, chunk_size=chunk_size
    )


def test_topk_m_equals_dense():
    B, T, H, M, V = 2, 21, 2, 8, 4
    v, logits, eta, mu, h0 = make_inputs(B, T, H, M, V)
    dense = chunk_factorization_memory(v, logits, eta, mu, None, h0, True)
    full = chunk_factorization_memory(v, logits, eta, mu, M, h0, True)
    for a, b in zip(dense, full):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fn", [chunk_factorization_memory, naive_factorization_memory])
@pytest.mark.parametrize("topk", [None, 3])
def test_varlen_equals_separate_runs(fn, topk):
    lengths = [5, 0, 40, 1, 19]
    offsets = offsets_of(lengths)
    T, H, M, V = sum(lengths), 2, 8, 4
    v, logits, eta, mu, h0 = make_inputs(1, T, H, M, V, N=len(lengths))
    o, ht, grads, dout, dht = run_with_grads(fn, (v, logits, eta, mu, h0), topk, cu_seqlens=offsets)
    for n, (bos, eos) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        piece = [x[:, bos:eos].detach().requires_grad_() for x in (v, logits, eta, mu)]
        state = h0[n : n + 1].detach().requires_grad_()
        if eos == bos:
            assert torch.equal(ht[n], h0[n].detach())
            continue
        o_n, ht_n = fn(*piece, topk=topk, initial_state=state, output_final_state=True)
        ((o_n * dout[:, bos:eos]).sum() + (ht_n * dht[n : n + 1]).sum()).backward()
        assert_close(f"o[{n}]", o[:, bos:eos], o_n, FWD_TOL)
        assert_close(f"final state[{n}]", ht[n : n + 1], ht_n, FWD_TOL)
        for name, full, x in zip(("dv", "dlogits", "deta", "dmu"), grads, piece):
            assert_close(f"{name}[{n}]", full[:, bos:eos], x.grad, BWD_TOL)
        assert_close(f"dh0[{n}]", grads[4][n : n + 1], state.grad, BWD_TOL)


@pytest.mark.parametrize("topk", [None, 2])
def test_two_halves_equal_one_run(topk):
    B, T, H, M, V = 2, 45, 2, 8, 4
    v, logits, eta, mu, h0 = make_inputs(B, T, H, M, V)
    o, ht = chunk_factorization_memory(v, logits, eta, mu, topk, h0, True)
    cut = 19
    o1, h1 = chunk_factorization_memory(v[:, :cut], logits[:, :cut], eta[:, :cut], mu[:, :cut], topk, h0, True)
    o2, h2 = chunk_factorization_memory(v[:, cut:], logits[:, cut:], eta[:, cut:], mu[:, cut:], topk, h1, True)
    assert_close("o", torch.cat([o1, o2], 1), o, FWD_TOL)
    assert_close("final state", h2, ht, FWD_TOL)


@pytest.mark.parametrize("topk", [None, 1])
def test_full_overwrite_eta_one_one_hot(topk):
    """theta = 1 overwrites the chosen row: each token reads back mu * its own value."""
    B, T, H, M, V = 2, 40, 2, 8, 4
    v, logits, eta, mu, h0 = make_inputs(B, T, H, M, V)
    with torch.no_grad():
        logits.copy_(torch.nn.functional.one_hot(torch.randint(M, (B, T, H)), M) * 1000.0)
        eta.fill_(1.0)
    assert_matches(
        chunk_factorization_memory, naive_factorization_memory, (v, logits, eta, mu, h0), topk, FWD_TOL, BWD_TOL
    )
    o, _ = chunk_factorization_memory(v, logits, eta, mu, topk, h0)
    assert_close("o", o, mu[..., None] * v, 1e-6)


def test_eta_zero_keeps_the_memory():
    B, T, H, M, V = 2, 30, 2, 8, 4
    v, logits, eta, mu, h0 = make_inputs(B, T, H, M, V)
    with torch.no_grad():
        eta.zero_()
    assert_matches(
        chunk_factorization_memory, naive_factorization_memory, (v, logits, eta, mu, h0), None, FWD_TOL, BWD_TOL
    )
    _, ht = chunk_factorization_memory(v, logits, eta, mu, None, h0, True)
    assert torch.equal(ht, h0.detach())


@pytest.mark.parametrize("topk", [None, 4])
def test_near_one_hot_routing(topk):
    """Logit differences of about 50: alpha is one-hot up to e^-50."""
    inputs = make_inputs(2, 70, 2, 16, 8, logit_scale=50.0)
    assert_matches(chunk_factorization_memory, naive_factorization_memory, inputs, topk, FWD_TOL, BWD_TOL)


def test_long_sequence_is_finite_and_exact():
    B, T, H, M, V = 1, 65536, 1, 4, 4
    v, logits, eta, mu, h0 = make_inputs(B, T, H, M, V, logit_scale=3.0)
    with torch.no_grad():
        o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, None, h0, True)
    o, ht = chunk_factorization_memory(v, logits, eta, mu, None, h0, True)
    assert_close("o", o.detach(), o_ref, FWD_TOL)
    assert_close("final state", ht.detach(), ht_ref, FWD_TOL)
    (o.sum() + ht.sum()).backward()
    for name, x in zip(("dv", "dlogits", "deta", "dmu", "dh0"), (v, logits, eta, mu, h0)):
        assert torch.isfinite(x.grad).all(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    inputs = make_inputs(2, 37, 2, 8, 16, dtype=dtype)
    o, ht = chunk_factorization_memory(*inputs[:4], None, inputs[4], True)
    assert o.dtype == dtype and ht.dtype == torch.float32
    assert_matches(chunk_factorization_memory, naive_factorization_memory, inputs, None, 1e-2, 1e-2)
