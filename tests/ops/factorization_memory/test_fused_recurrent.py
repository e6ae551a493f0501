"""The decoding op against the naive recurrence, and decoding token by token against one chunked run."""

import pytest
import torch

from fla_factmem.ops import chunk_factorization_memory, fused_recurrent_factorization_memory, naive_factorization_memory
from tests.utils import assert_close, assert_matches, make_inputs


@pytest.mark.parametrize(("T", "M", "topk"), [(1, 8, None), (1, 8, 1), (9, 16, 4), (9, 16, 16)])
def test_fused_recurrent_matches_naive(T, M, topk):
    inputs = make_inputs(3, T, 2, M, 8)
    assert_matches(fused_recurrent_factorization_memory, naive_factorization_memory, inputs, topk, 1e-6, 1e-5)


@pytest.mark.parametrize("topk", [None, 3])
def test_token_by_token_decoding_equals_one_chunked_run(topk):
    B, T, H, M, V = 2, 12, 2, 8, 4
    v, logits, eta, mu, h0 = (x.detach() if x is not None else None for x in make_inputs(B, T, H, M, V))
    o_ref, ht_ref = chunk_factorization_memory(v, logits, eta, mu, topk, h0, True)
    state, outs = h0, []
    for t in range(T):
        o_t, state = fused_recurrent_factorization_memory(
            v[:, t : t + 1], logits[:, t : t + 1], eta[:, t : t + 1], mu[:, t : t + 1], topk, state, True
        )
        outs.append(o_t)
    assert_close("o", torch.cat(outs, 1), o_ref, 1e-5)
    assert_close("final state", state, ht_ref, 1e-5)


def test_fused_recurrent_varlen():
    offsets = torch.tensor([0, 3, 4, 10])
    inputs = make_inputs(1, 10, 2, 8, 4, N=3)
    assert_matches(
        fused_recurrent_factorization_memory, naive_factorization_memory, inputs, 2, 1e-6, 1e-5, cu_seqlens=offsets
    )
