"""Picks made by the caller (``topk_indices``, with the picks' logits ``[B, T, H, K]``): the op on
them is the op on ``[B, T, H, M]`` logits that are -inf outside the picks. The sparse Triton kernels
run them on the CPU through TRITON_INTERPRET=1 at small shapes and on the GPU (``cuda`` marker) at
real shapes; nothing of size M is made, forward or backward."""

import pytest
import torch

from fla_factmem.ops import (
    chunk_factorization_memory,
    fused_recurrent_factorization_memory,
    naive_factorization_memory,
)
from fla_factmem.ops.factorization_memory.chunk import ChunkSparseFactorizationMemoryFunction
from fla_factmem.ops.factorization_memory.chunk_torch import chunk_factorization_memory_torch
from fla_factmem.ops.factorization_memory.routing import run_on_weights, top_rows
from tests.ops.factorization_memory.test_kernels import GRAD_TOLERANCES
from tests.ops.factorization_memory.test_sparse_kernels import POISON_BITS
from tests.utils import GRAD_NAMES, assert_close, assert_matches, make_inputs, offsets_of, run_with_grads


def random_picks(B, T, H, M, K, dtype=torch.int64, device="cpu"):
    """``[B, T, H, K]`` distinct rows of M per token, in random order."""
    return torch.rand(B, T, H, M, device=device).argsort(-1)[..., :K].to(dtype)


def on_dense_logits(rows, M):
    """The op of the definition on the picks' logits scattered into -inf logits of width M (the
    naive op, or ``impl``), as a function of the picks' logits."""

    def op(v, logits, eta, mu, topk, initial_state=None, output_final_state=False, cu_seqlens=None, impl=None):
        dense = torch.full((*logits.shape[:-1], M), float("-inf"), dtype=logits.dtype, device=logits.device)
        dense = dense.scatter(-1, rows.long(), logits)
        impl = impl or naive_factorization_memory
        return impl(v, dense, eta, mu, rows.shape[-1], initial_state, output_final_state, cu_seqlens=cu_seqlens)

    return op


def triton_given_picks(rows, M):
    """The sparse Triton forward and backward on these picks, on any device."""

    def op(v, logits, eta, mu, topk, initial_state=None, output_final_state=False, cu_seqlens=None):
        return ChunkSparseFactorizationMemoryFunction.apply(
            v, logits, eta, mu, None, rows, M, initial_state, output_final_state, cu_seqlens, True
        )

    return op


def picks_inputs(B, T, H, M, K, V, rows_dtype=torch.int64, device="cpu", **kwargs):
    """make_inputs' tensors with the logits cut to K per token, and the picks ``[B, T, H, K]``."""
    v, logits, eta, mu, h0 = make_inputs(B, T, H, K, V, device=device, logit_scale=2.0, **kwargs)
    h0 = None if h0 is None else torch.randn(h0.shape[0], H, M, V, device=device).requires_grad_()
    return (v, logits, eta, mu, h0), random_picks(B, T, H, M, K, rows_dtype, device)


@pytest.mark.parametrize(
    ("B", "T", "M", "V", "K", "with_state", "rows_dtype"),
    # T = 1 and K = 1; M not a power of 2; V not a power of 2; K = M
    [(2, 1, 16, 16, 1, False, torch.int64), (1, 37, 40, 16, 4, True, torch.int32),
     (1, 17, 64, 20, 16, False, torch.int64), (1, 8, 24, 16, 24, True, torch.int32)],
)  # fmt: skip
def test_given_picks_match_definition(B, T, M, V, K, with_state, rows_dtype):
    inputs, rows = picks_inputs(B, T, 2, M, K, V, rows_dtype, with_state=with_state)
    assert_matches(triton_given_picks(rows, M), on_dense_logits(rows, M), inputs, None, 1e-5, 1e-4)


def test_given_picks_varlen():
    offsets = offsets_of([18, 0, 1, 21]).to(torch.int32)
    inputs, rows = picks_inputs(1, 40, 2, 32, 4, 16, N=4)
    assert_matches(
        triton_given_picks(rows, 32), on_dense_logits(rows, 32), inputs, None, 1e-5, 1e-4, cu_seqlens=offsets
    )


@pytest.mark.parametrize("impl", ["triton", "public"])
def test_given_top_k_picks_equal_topk(impl):
    """Given the top K of dense logits and their logits, the op (the kernels, or the public op's
    PyTorch path on the CPU) equals the op with ``topk`` K on the dense logits: the same output
    and final state, and the dense logits' gradient at the picks (0 elsewhere)."""
    M, K = 48, 6
    inputs = make_inputs(1, 40, 2, M, 16, logit_scale=2.0)
    v, logits, eta, mu, h0 = inputs
    rows = top_rows(logits.detach(), K)[1]
    picked = logits.detach().gather(-1, rows).requires_grad_()
    fn = triton_given_picks(rows, M) if impl == "triton" else on_public_op(rows, M)
    o, ht, grads, dout, dht = run_with_grads(fn, (v, picked, eta, mu, h0), None)
    o_ref, ht_ref, grads_ref, _, _ = run_with_grads(naive_factorization_memory, inputs, K, dout=dout, dht=dht)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)
    grads_ref[1] = grads_ref[1].gather(-1, rows)
    for name, g, ref in zip(GRAD_NAMES, grads, grads_ref):
        assert_close(name, g, ref, 1e-4)


def on_public_op(rows, M, public_op=chunk_factorization_memory):
    def op(v, logits, eta, mu, topk, initial_state=None, output_final_state=False, cu_seqlens=None):
        return public_op(
            v, logits, eta, mu, topk, initial_state, output_final_state, cu_seqlens, topk_indices=rows, num_memories=M
        )

    return op


PUBLIC_OPS = [chunk_factorization_memory, fused_recurrent_factorization_memory, naive_factorization_memory]


@pytest.mark.parametrize("public_op", PUBLIC_OPS, ids=lambda f: f.__name__.split("_")[0])
@pytest.mark.parametrize("K", [1, 5, 24])  # K = M: dense routing over the picks' order of rows
def test_every_public_op_takes_given_picks(public_op, K):
    """The three ops (on the CPU: the PyTorch paths) on given picks equal the definition on the
    -inf logits, output, final state and gradients, with packed sequences and an initial state."""
    offsets = offsets_of([9, 1, 13])
    inputs, rows = picks_inputs(1, 23, 2, 24, K, 8, N=3)
    assert_matches(
        on_public_op(rows, 24, public_op), on_dense_logits(rows, 24), inputs, None, 1e-5, 1e-4, cu_seqlens=offsets
    )


def test_given_picks_never_touch_other_rows():
    """Rows no token picks, poisoned in the initial state, come out bit-identical."""
    M = 64
    (v, logits, eta, mu, h0), rows = picks_inputs(2, 20, 2, M, 3, 16)
    chosen = torch.zeros(2, 20, 2, M, dtype=torch.bool).scatter_(-1, rows, True).any(1)
    assert not chosen.all(), "the test needs rows that no token picks"
    poison = torch.tensor(POISON_BITS, dtype=torch.int32).view(torch.float32)
    state = torch.where(chosen[..., None], h0.detach(), poison)
    with torch.no_grad():
        o, ht = triton_given_picks(rows, M)(v, logits, eta, mu, None, state, True)
        o_ref, ht_ref = on_dense_logits(rows, M)(v, logits, eta, mu, None, h0, True)
    assert torch.equal(ht.view(torch.int32)[~chosen], state.view(torch.int32)[~chosen]), "an unpicked row was written"
    assert_close("o (finite: no unpicked row was read)", o, o_ref, 1e-5)
    assert_close("picked rows", ht[chosen], ht_ref[chosen], 1e-5)


BAD_PICKS = [
    (
        "float indices",
        dict(topk_indices=torch.zeros(1, 3, 2, 2)),
        TypeError,
        "`topk_indices` must be an int32 or int64",
    ),
    ("shape", dict(topk_indices=torch.zeros(1, 3, 2, 3, dtype=torch.long)), ValueError, "the shape of `logits`"),
    ("all M logits", dict(logits=torch.randn(1, 3, 2, 8)), ValueError, "holds the picks' logits only"),
    ("no M", dict(num_memories=None), TypeError, "needs `num_memories`"),
    ("K > M", dict(num_memories=1), ValueError, "need 1 <= K <= M"),
    ("topk differs", dict(topk=3), ValueError, "`topk` = 3 differs"),
    ("M without picks", dict(topk_indices=None), ValueError, "`num_memories` goes with `topk_indices`"),
    ("logits heads", dict(logits=torch.randn(1, 3, 1, 2)), ValueError, r"\[B, T, H, K\] = \[1, 3, 2, K\]"),
    ("state width", dict(initial_state=torch.zeros(1, 2, 9, 4)), ValueError, r"\[N, H, M, V\] = \[1, 2, 8, 4\]"),
]


@pytest.mark.parametrize("public_op", PUBLIC_OPS, ids=lambda f: f.__name__.split("_")[0])
@pytest.mark.parametrize(("what", "change", "error", "message"), BAD_PICKS, ids=[c[0] for c in BAD_PICKS])
def test_given_picks_bad_input_is_refused(public_op, what, change, error, message):
    kwargs = dict(
        v=torch.randn(1, 3, 2, 4),
        logits=torch.randn(1, 3, 2, 2),
        eta=torch.rand(1, 3, 2),
        mu=torch.rand(1, 3, 2),
        topk_indices=torch.zeros(1, 3, 2, 2, dtype=torch.long),
        num_memories=8,
    )
    with pytest.raises(error, match=message):
        public_op(**{**kwargs, **change})


# ---------------------------------------------------------------- GPU, real shapes


@pytest.mark.cuda
@pytest.mark.parametrize(("B", "T", "M", "K"), [(2, 1000, 4096, 16), (1, 2049, 1024, 64), (1, 200, 8192, 8)])
@pytest.mark.parametrize(("dtype", "fwd_tol", "bwd_tol"), GRAD_TOLERANCES)
def test_cuda_given_picks(B, T, M, K, dtype, fwd_tol, bwd_tol):
    """The public op on CUDA against the PyTorch chunked path in float64 on the dense logits."""
    inputs, rows = picks_inputs(B, T, 4, M, K, 64, torch.int32, "cuda", dtype=dtype)
    check_against_float64(inputs, rows, M, fwd_tol, bwd_tol)


@pytest.mark.cuda
def test_cuda_given_picks_varlen():
    offsets = offsets_of([700, 1, 0, 1299], "cuda")
    inputs, rows = picks_inputs(1, 2000, 4, 1024, 16, 64, device="cuda", N=4)
    check_against_float64(inputs, rows, 1024, 1e-5, 1e-4, offsets)


@pytest.mark.cuda
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_decode_given_picks(inplace):
    """Decoding on given picks (the sparse decode kernel on the -inf logits) continues the chunked
    op's prefill on them: the same outputs and state as the chunked op over the whole sequence."""
    B, T, H, M, K, V = 4, 70, 4, 1024, 16, 64
    (v, logits, eta, mu, _), rows = picks_inputs(B, T, H, M, K, V, torch.int32, "cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        o_ref, ht_ref = on_public_op(rows, M)(v, logits, eta, mu, None, None, True)
        o, state = on_public_op(rows[:, :64], M)(v[:, :64], logits[:, :64], eta[:, :64], mu[:, :64], None, None, True)
        pieces = [o]
        for t in range(64, T):
            step = slice(t, t + 1)
            o, state = fused_recurrent_factorization_memory(
                v[:, step], logits[:, step], eta[:, step], mu[:, step], None, state, True,
                inplace_final_state=inplace, topk_indices=rows[:, step], num_memories=M,
            )  # fmt: skip
            pieces.append(o)
    assert_close("o", torch.cat(pieces, 1), o_ref, 1e-2)
    assert_close("final state", state, ht_ref, 1e-2)


def check_against_float64(inputs, rows, M, fwd_tol, bwd_tol, cu_seqlens=None):
    o, ht, grads, dout, dht = run_with_grads(on_public_op(rows, M), inputs, None, cu_seqlens=cu_seqlens)
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in inputs]

    def float64_path(v, dense, eta, mu, topk, h0, output_final_state, cu_seqlens):
        return run_on_weights(chunk_factorization_memory_torch, v, dense, eta, mu, topk, h0, True, cu_seqlens)

    o_ref, ht_ref = on_dense_logits(rows, M)(*leaves[:4], None, leaves[4], True, cu_seqlens, impl=float64_path)
    wanted = [x for x in leaves if x is not None]
    found = iter(torch.autograd.grad((o_ref, ht_ref), wanted, (dout.double(), dht.double())))
    assert o.dtype == inputs[0].dtype and grads[1].shape == rows.shape
    assert_close("o", o, o_ref, fwd_tol)
    assert_close("final state", ht, ht_ref, fwd_tol)
    for name, x, g in zip(GRAD_NAMES, inputs, grads):
        if x is not None:
            assert_close(name, g, next(found), bwd_tol)
