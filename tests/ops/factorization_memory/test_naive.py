"""The reference itself is checked against a float64 loop written here, element by element."""

import math

import pytest
import torch

from fla_factmem.ops import naive_factorization_memory
from tests.utils import assert_close


def float64_loop(v, logits, eta, mu, topk, h0):
    """SPEC section 2 transcribed with Python floats, sharing no code with the package."""
    B, T, H, V = v.shape
    M = logits.shape[-1]
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    hT = torch.zeros(B, H, M, V, dtype=torch.float64)
    for b in range(B):
        for hd in range(H):
            h = [[float(h0[b, hd, j, c]) if h0 is not None else 0.0 for c in range(V)] for j in range(M)]
            for t in range(T):
                lg = [float(x) for x in logits[b, t, hd]]
                active = sorted(range(M), key=lambda j: -lg[j])[: (topk or M)]
                top = max(lg[j] for j in active)
                z = sum(math.exp(lg[j] - top) for j in active)
                alpha = [math.exp(lg[j] - top) / z if j in active else 0.0 for j in range(M)]
                e, m = float(eta[b, t, hd]), float(mu[b, t, hd])
                for j in range(M):
                    th = e * alpha[j]
                    h[j] = [(1 - th) * h[j][c] + th * float(v[b, t, hd, c]) for c in range(V)]
                for c in range(V):
                    o[b, t, hd, c] = sum(m * alpha[j] * h[j][c] for j in range(M))
            hT[b, hd] = torch.tensor(h, dtype=torch.float64)
    return o, hT


@pytest.mark.parametrize("topk", [None, 1, 3, 6])
@pytest.mark.parametrize("with_state", [False, True])
def test_naive_matches_float64_loop(topk, with_state):
    B, T, H, M, V = 2, 9, 2, 6, 3
    v, logits = torch.randn(B, T, H, V), torch.randn(B, T, H, M) * 2
    eta, mu = torch.rand(B, T, H), torch.rand(B, T, H)
    h0 = torch.randn(B, H, M, V) if with_state else None
    o, hT = naive_factorization_memory(v, logits, eta, mu, topk, h0, output_final_state=True)
    o_ref, hT_ref = float64_loop(v, logits, eta, mu, topk, h0)
    assert o.dtype == torch.float32 and hT.dtype == torch.float32
    assert_close("o", o, o_ref, 1e-6)
    assert_close("final state", hT, hT_ref, 1e-6)


@pytest.mark.parametrize("M", [4, 8, 64, 200])
def test_naive_ties_go_to_the_lower_rows(M):
    """Among equal logits the top K are the lower rows, as in the Triton kernels, whatever M
    (torch.topk's own choice among ties changes with M)."""
    logits = torch.zeros(1, 1, 1, M)
    logits[..., M - 1] = 1.0
    _, hT = naive_factorization_memory(
        torch.randn(1, 1, 1, 4), logits, torch.ones(1, 1, 1), torch.ones(1, 1, 1), 3, output_final_state=True
    )
    assert hT[0, 0].abs().sum(-1).nonzero().flatten().tolist() == [0, 1, M - 1]


def test_naive_float64_inputs_compute_in_float64():
    B, T, H, M, V = 1, 7, 1, 5, 4
    args = (
        torch.randn(B, T, H, V).double(),
        torch.randn(B, T, H, M).double(),
        torch.rand(B, T, H).double(),
        torch.rand(B, T, H).double(),
    )
    o, hT = naive_factorization_memory(*args, topk=2, output_final_state=True)
    o_ref, hT_ref = float64_loop(*args, 2, None)
    assert o.dtype == torch.float64 and hT.dtype == torch.float64
    assert_close("o", o, o_ref, 1e-13)
    assert_close("final state", hT, hT_ref, 1e-13)


def test_inactive_rows_untouched_by_naive():
    """theta = 0 rows keep their bits, which the kernels' poison test relies on."""
    B, T, H, M, V = 1, 5, 1, 8, 4
    h0 = torch.randn(B, H, M, V)
    logits = torch.randn(B, T, H, M)
    logits[..., :4] += 100  # rows 4.. are never in the top 2
    _, hT = naive_factorization_memory(
        torch.randn(B, T, H, V),
        logits,
        torch.rand(B, T, H),
        torch.rand(B, T, H),
        topk=2,
        initial_state=h0,
        output_final_state=True,
    )
    assert torch.equal(hT[..., 4:, :], h0[..., 4:, :])
