"""Logits, eta and mu as views whose tokens lie at one stride, as the layer passes them when
decoding (the logits a slice of its input projection's output, eta and mu unbound from one
tensor): the decode kernels and the sparse routing read them where they lie
(``launch.token_strided``) and give what they give on contiguous copies (the same picks; the
same values up to the order of sums, which the compiler may change with the alignment). On the
CPU through TRITON_INTERPRET=1, on the GPU with the ``cuda`` marker."""

import pytest
import torch

from fla_factmem.ops import chunk_factorization_memory, fused_recurrent_factorization_memory, naive_factorization_memory
from fla_factmem.ops.factorization_memory import chunk as chunk_module
from fla_factmem.ops.factorization_memory import fused_recurrent as fused_recurrent_module
from fla_factmem.ops.factorization_memory.launch import fused_recurrent_fwd, sparse_routing, token_strided
from tests.utils import assert_close, make_inputs


def projection_views(logits, eta, mu, before=5, between=3):
    """``logits`` ``[B, T, H, M]``, ``eta`` and ``mu`` ``[B, T, H]`` copied into one ``[B, T, width]``
    tensor after ``before`` and ``between`` other columns, as the layer's ``in_proj`` lays them out
    (8 and 8 give the 340M model's alignment: rows of a multiple of 8 elements, not 16), and
    returned as views of it (eta and mu unbound from one ``[B, T, 2, H]`` block)."""
    B, T, H, M = logits.shape
    fused = torch.cat(
        [
            torch.randn(B, T, before, dtype=logits.dtype, device=logits.device),
            logits.flatten(-2),
            torch.randn(B, T, between, dtype=logits.dtype, device=logits.device),
            torch.stack([eta, mu], -2).flatten(-2),
        ],
        -1,
    )
    rates = fused[..., before + H * M + between :].unflatten(-1, (2, H)).unbind(-2)
    return fused[..., before : before + H * M].unflatten(-1, (H, M)), *rates


def reads_in_place(x, stride):
    got, got_stride = token_strided(x)
    return got is x and got_stride == stride


def test_token_strided_reads_packed_views_in_place_and_copies_the_rest():
    B, T, H, M = 3, 4, 2, 8
    logits, eta, mu = projection_views(torch.randn(B, T, H, M), torch.rand(B, T, H), torch.rand(B, T, H))
    width = 8 + H * M + 2 * H
    for view in (logits, eta, mu):
        assert not view.is_contiguous() and reads_in_place(view, width)
    assert reads_in_place(logits[:, :1], T * width), "one token per sequence: the stride of B"
    assert reads_in_place(logits[:1], width)
    contiguous = torch.randn(B, T, H, M)
    assert reads_in_place(contiguous, H * M)
    for unpacked in (
        contiguous.transpose(2, 3).contiguous().transpose(2, 3),  # a head's M not packed
        contiguous.transpose(1, 2).contiguous().transpose(1, 2),  # a token's heads not packed
        contiguous[:, :3],  # sequences shorter than their rows' stride
    ):
        copy, stride = token_strided(unpacked)
        assert copy.is_contiguous() and torch.equal(copy, unpacked) and stride == H * M


@pytest.mark.parametrize(("M", "topk"), [(40, 7), (1000, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_routing_of_projection_views(M, topk, dtype):
    check_sparse_routing_of_projection_views(M, topk, dtype, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize(("M", "topk"), [(1024, 16), (4096, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sparse_routing_of_projection_views(M, topk, dtype):
    check_sparse_routing_of_projection_views(M, topk, dtype, "cuda")


def check_sparse_routing_of_projection_views(M, topk, dtype, device):
    _, logits, eta, mu = (x.detach() for x in make_inputs(2, 9, 3, M, 4, dtype, device, with_state=False)[:4])
    view = projection_views(logits, eta, mu)[0]
    expected, got = sparse_routing(logits, topk), sparse_routing(view, topk)
    assert torch.equal(got.rows, expected.rows)
    assert_close("alpha", got.alpha, expected.alpha, 1e-6)


@pytest.mark.parametrize(("M", "topk"), [(24, None), (64, 16)])
@pytest.mark.parametrize("T", [1, 3])
def test_decode_of_projection_views(M, topk, T):
    check_decode_of_projection_views(4, T, 2, M, 16, topk, torch.float32, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize(("M", "topk"), [(64, None), (256, None), (1024, 16), (4096, 16)])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("before", "between"), [(5, 3), (8, 8)])
def test_cuda_decode_of_projection_views(M, topk, T, dtype, before, between):
    check_decode_of_projection_views(32, T, 4, M, 256 if topk else 64, topk, dtype, "cuda", before, between)


def check_decode_of_projection_views(B, T, H, M, V, topk, dtype, device, before=5, between=3):
    v, logits, eta, mu, h0 = (x.detach() for x in make_inputs(B, T, H, M, V, dtype, device, logit_scale=2.0))
    o_ref, ht_ref = fused_recurrent_fwd(v, logits, eta, mu, h0, True, None, topk)
    o, ht = fused_recurrent_fwd(v, *projection_views(logits, eta, mu, before, between), h0, True, None, topk)
    assert_close("o", o, o_ref, 1e-6 if dtype == torch.float32 else 1e-2)
    assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.parametrize("topk", [None, 4])
def test_decode_of_projection_views_varlen_in_place(topk):
    offsets = torch.tensor([0, 3, 3, 4, 9], dtype=torch.int32)
    v, logits, eta, mu, h0 = (x.detach() for x in make_inputs(1, 9, 2, 32, 16, N=4, logit_scale=2.0))
    o_ref, ht_ref = fused_recurrent_fwd(v, logits, eta, mu, h0, True, offsets, topk)
    state = h0.clone()
    o, ht = fused_recurrent_fwd(
        v, *projection_views(logits, eta, mu), state, True, offsets, topk, inplace_final_state=True
    )
    assert ht is state
    assert_close("o", o, o_ref, 1e-6)
    assert_close("final state", ht, ht_ref, 1e-6)


@pytest.mark.parametrize(
    ("op", "topk"), [("chunk", None), ("chunk", 3), ("fused_recurrent", None), ("fused_recurrent", 3)]
)
def test_public_ops_take_strided_cu_seqlens(op, topk, monkeypatch):
    """A view of offsets at stride 2 gives what its values give: the kernels index ``cu_seqlens``
    as a flat array, so the public ops make it contiguous (FLA's ``input_guard`` does the same).
    The ops' CUDA paths are taken on the CPU tensors here, through the interpreter."""
    module = {"chunk": chunk_module, "fused_recurrent": fused_recurrent_module}[op]
    M = 8
    monkeypatch.setattr(module, "runs_dense_triton", lambda v, logits, k, *others: k is None)
    monkeypatch.setattr(module, "runs_sparse_triton", lambda v, logits, k, *others: k is not None and k < M)
    monkeypatch.setattr(fused_recurrent_module, "_DECODE_LAUNCHES", {})  # kept under the patches only
    strided = torch.tensor([0, 99, 5, 99, 5, 99, 9])[::2]
    inputs = [x.detach() for x in make_inputs(1, 9, 2, M, 4, N=3)]
    fn = {"chunk": chunk_factorization_memory, "fused_recurrent": fused_recurrent_factorization_memory}[op]
    with torch.no_grad():
        o, ht = fn(*inputs[:4], topk, inputs[4], True, strided)
        o_ref, ht_ref = naive_factorization_memory(*inputs[:4], topk, inputs[4], True, strided.contiguous())
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)
