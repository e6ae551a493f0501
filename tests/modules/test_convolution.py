"""``short_convolution``, the training call of the short convolution in our kernels: through the
interpreter on the CPU against the module's PyTorch path under autograd; on the GPU against FLA's
``causal_conv1d``, and the module's choice between the two."""

import pytest
import torch

from fla_factmem.modules import ShortConvolution
from fla_factmem.modules import convolution as convolution_module
from fla_factmem.modules.convolution import BWD_BT, short_convolution
from tests.utils import assert_close, offsets_of, output_and_grads

TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def module_reference(conv, cu_seqlens):
    """The module's PyTorch path in float32 as a function of (x, weight, bias)."""

    def run(x, weight, bias):
        params = {"weight": weight.unsqueeze(1)} | ({} if bias is None else {"bias": bias})
        return torch.func.functional_call(conv, params, (x.float(),), {"cu_seqlens": cu_seqlens})[0]

    return run


# the backward's programs walk 2 tiles of BWD_BT rows in these tests: segments of 2 BWD_BT rows
TILES_PER_PROGRAM = 2
CASES = [
    # B, lengths (packed when a list), D, W, bias, activation
    (2, 9, 12, 4, False, "silu"),
    (1, 1, 16, 4, True, "silu"),
    (3, 3 * BWD_BT + 7, 100, 4, True, None),
    (2, 4 * BWD_BT, 8, 4, False, "silu"),
    (1, [5, 0, 1, 2 * BWD_BT + 3], 8, 3, False, "swish"),
    (1, [0, 4, 2 * BWD_BT - 6, 0, BWD_BT], 100, 4, True, "silu"),
    (2, 6, 8, 1, True, "silu"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("B", "lengths", "D", "W", "bias", "activation"), CASES)
def test_short_convolution_kernels(B, lengths, D, W, bias, activation, dtype, monkeypatch):
    """Sequences shorter than a tile, across tiles and across the backward's segments (whose
    last rows' input gradient reads the next segment's first rows), packed with empty ones."""
    monkeypatch.setattr(convolution_module, "BWD_TILES", TILES_PER_PROGRAM)
    packed = isinstance(lengths, list)
    T = sum(lengths) if packed else lengths
    cu_seqlens = offsets_of(lengths) if packed else None
    conv = ShortConvolution(D, W, bias=bias, activation=activation)
    x, dy = torch.randn(B, T, D).to(dtype), torch.randn(B, T, D).to(dtype)
    weight = torch.randn(D, W)
    b = torch.randn(D) if bias else None
    ours = output_and_grads(lambda *a: short_convolution(*a, activation, cu_seqlens), (x, weight, b), dy)
    ref = output_and_grads(module_reference(conv, cu_seqlens), (x.float(), weight, b), dy.float())
    assert ours[0].dtype == dtype
    for name, a, r in zip(("y", "dx", "dw", "db"), ours, ref):
        assert_close(name, a, r, TOLERANCES[dtype])


def test_short_convolution_checks_its_arguments():
    x, weight = torch.randn(2, 5, 8), torch.randn(8, 4)
    for args in ((x, weight[:7]), (x[0], weight), (x, weight, torch.randn(7))):
        with pytest.raises(ValueError, match="short_convolution"):
            short_convolution(*args)
    with pytest.raises(ValueError, match="activation 'relu'"):
        short_convolution(x, weight, None, "relu")
    with pytest.raises(ValueError, match="B = 1"):
        short_convolution(x, weight, cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="spans 4 tokens"):
        short_convolution(x[:1], weight, cu_seqlens=torch.tensor([0, 1, 4]))


def test_short_convolution_of_no_tokens():
    x = torch.randn(2, 0, 8)
    weight, bias = torch.randn(8, 4, requires_grad=True), torch.randn(8, requires_grad=True)
    y = short_convolution(x, weight, bias)
    assert y.shape == (2, 0, 8)
    dw, db = torch.autograd.grad(y.sum(), (weight, bias))
    assert not dw.any() and not db.any()


def test_short_convolution_takes_a_strided_bias():
    x, weight, bias = torch.randn(2, 5, 8), torch.randn(8, 4), torch.randn(16)[::2]
    y = short_convolution(x, weight, bias)
    assert_close("y", y, short_convolution(x, weight, bias.contiguous()), 0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("B", "lengths", "bias"), [(4, 2048, False), (1, [1000, 1, 3047], True)])
def test_cuda_short_convolution_matches_fla(B, lengths, bias, dtype):
    from fla.modules.causal_conv1d import causal_conv1d

    packed = isinstance(lengths, list)
    T = sum(lengths) if packed else lengths
    cu_seqlens = offsets_of(lengths, "cuda") if packed else None
    D, W = 1024, 4
    x, dy = (torch.randn(B, T, D, device="cuda").to(dtype) for _ in range(2))
    weight = torch.randn(D, W, device="cuda")
    b = torch.randn(D, device="cuda") if bias else None
    ours = output_and_grads(lambda *a: short_convolution(*a, "silu", cu_seqlens), (x, weight, b), dy)
    fla = output_and_grads(
        lambda x, w, b: causal_conv1d(x, w, b, activation="silu", cu_seqlens=cu_seqlens)[0], (x, weight, b), dy
    )
    for name, a, r in zip(("y", "dx", "dw", "db"), ours, fla):
        assert_close(name, a, r, TOLERANCES[dtype])


@pytest.mark.cuda
def test_cuda_short_convolution_module_takes_our_kernels_without_a_cache(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(True)
        return short_convolution(*args)

    monkeypatch.setattr(convolution_module, "short_convolution", spy)
    conv = ShortConvolution(64, 4).cuda()
    x = torch.randn(2, 10, 64, device="cuda")
    y, state = conv(x)
    assert calls and state is None
    calls.clear()
    y_cached, state = conv(x, output_final_state=True)
    assert not calls and state is not None
    assert_close("y", y, y_cached, 1e-6)
