"""Bad input is refused with an error that names the argument and what was expected."""

import pytest
import torch

from fla_factmem.ops import chunk_factorization_memory, fused_recurrent_factorization_memory, naive_factorization_memory

OPS = [chunk_factorization_memory, fused_recurrent_factorization_memory, naive_factorization_memory]
B, T, H, M, V = 2, 6, 2, 4, 3


def good():
    return dict(
        v=torch.randn(B, T, H, V), logits=torch.randn(B, T, H, M), eta=torch.rand(B, T, H), mu=torch.rand(B, T, H)
    )


CASES = [
    ("v has wrong rank", dict(v=torch.randn(B, T, H * V)), ValueError, "`v` must have shape"),
    ("logits mismatched", dict(logits=torch.randn(B, T + 1, H, M)), ValueError, "`logits` must have shape"),
    ("eta mismatched", dict(eta=torch.rand(B, T, H, 1)), ValueError, "`eta` must have shape"),
    ("mu mismatched", dict(mu=torch.rand(B, T)), ValueError, "`mu` must have shape"),
    ("integer v", dict(v=torch.ones(B, T, H, V, dtype=torch.long)), TypeError, "`v` must be a floating"),
    ("bool eta", dict(eta=torch.ones(B, T, H, dtype=torch.bool)), TypeError, "`eta` must be a floating"),
    ("complex logits", dict(logits=torch.randn(B, T, H, M, dtype=torch.complex64)), TypeError, "`logits`"),
    ("not a tensor", dict(mu=[0.5]), TypeError, "`mu` must be a torch.Tensor"),
    ("topk zero", dict(topk=0), ValueError, "`topk` must satisfy 1 <= topk <= M = 4"),
    ("topk too large", dict(topk=M + 1), ValueError, "`topk` must satisfy"),
    ("topk float", dict(topk=2.0), TypeError, "`topk` must be None or an int"),
    ("topk bool", dict(topk=True), TypeError, "`topk` must be None or an int"),
    ("state shape", dict(initial_state=torch.zeros(B, H, M, V + 1)), ValueError, "`initial_state` must have shape"),
    ("state dtype", dict(initial_state=torch.zeros(B, H, M, V, dtype=torch.int32)), TypeError, "`initial_state`"),
    ("cu_seqlens with B > 1", dict(cu_seqlens=torch.tensor([0, T])), ValueError, "B = 1"),
    (
        "empty T",
        dict(
            v=torch.randn(B, 0, H, V), logits=torch.randn(B, 0, H, M), eta=torch.rand(B, 0, H), mu=torch.rand(B, 0, H)
        ),
        ValueError,
        "must be >= 1",
    ),
    (
        "empty batch",
        dict(
            v=torch.randn(0, T, H, V), logits=torch.randn(0, T, H, M), eta=torch.rand(0, T, H), mu=torch.rand(0, T, H)
        ),
        ValueError,
        "must be >= 1",
    ),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(("what", "change", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused(op, what, change, error, message):
    kwargs = {**good(), **change}
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(")):
        op(**kwargs)


def packed():
    return dict(
        v=torch.randn(1, T, H, V), logits=torch.randn(1, T, H, M), eta=torch.rand(1, T, H), mu=torch.rand(1, T, H)
    )


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    ("cu_seqlens", "message"),
    [
        (torch.tensor([1, T]), "start at 0 and end at T"),
        (torch.tensor([0, T - 1]), "start at 0 and end at T"),
        (torch.tensor([0, 4, 2, T]), "non-decreasing"),
        (torch.tensor([0.0, T]), "int32 or int64"),
        (torch.tensor([[0, T]]), "1-D"),
        (torch.tensor([0]), "1-D with N"),
    ],
)
def test_bad_cu_seqlens_is_refused(op, cu_seqlens, message):
    with pytest.raises((ValueError, TypeError), match=message):
        op(**packed(), cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("op", OPS)
def test_state_must_match_the_number_of_sequences(op):
    with pytest.raises(ValueError, match=r"\[N, H, M, V\] = \[3, "):
        op(**packed(), cu_seqlens=torch.tensor([0, 1, 2, T]), initial_state=torch.zeros(1, H, M, V))


def test_bad_chunk_size_is_refused():
    with pytest.raises(ValueError, match="`chunk_size` must be a positive int"):
        chunk_factorization_memory(**good(), chunk_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for a second device")
@pytest.mark.cuda
@pytest.mark.parametrize("op", OPS)
def test_mixed_devices_are_refused(op):
    kwargs = {k: x.cuda() for k, x in good().items()}
    kwargs["eta"] = kwargs["eta"].cpu()
    with pytest.raises(ValueError, match="`eta` is on cpu but `v` is on cuda"):
        op(**kwargs)


def test_mixed_devices_are_refused_without_a_gpu():
    kwargs = good()
    kwargs["mu"] = kwargs["mu"].to("meta")
    with pytest.raises(ValueError, match="`mu` is on meta but `v` is on cpu"):
        chunk_factorization_memory(**kwargs)


def test_eta_above_one_is_refused_by_the_chunked_pytorch_path():
    """eta * alpha > 1 (eta outside [0, 1]) makes a decay 1 - eta alpha < 0, which the chunked
    path's log-decays cannot stand for: a clear error there instead of NaN."""
    kwargs = good()
    kwargs["logits"][..., 0] += 10.0  # alpha of row 0 near 1
    kwargs["eta"] = kwargs["eta"] + 1.0
    with pytest.raises(ValueError, match=r"needs eta \* alpha <= 1"):
        chunk_factorization_memory(**kwargs)
