"""The SDPA attention layer against an explicit softmax reference: RoPE, GQA, sliding window,
padding, packed sequences and the cache."""

import math

import pytest
import torch
from einops import repeat
from fla.models.cache_utils import Cache
from fla.modules.rotary import rotary_embedding_ref

from fla_factmem.layers import Attention
from tests.utils import assert_close

D = 32


def reference(layer, x, mask=None):
    """Attention written out: FLA's reference RoPE at positions that skip padding, an explicit
    causal (windowed, padded) softmax, zeros at padded queries."""
    B, T, _ = x.shape
    d = layer.head_dim
    q = layer.q_proj(x).unflatten(-1, (layer.num_heads, d))
    k = layer.k_proj(x).unflatten(-1, (layer.num_kv_heads, d))
    v = layer.v_proj(x).unflatten(-1, (layer.num_kv_heads, d))
    mask = torch.ones(B, T, dtype=torch.long, device=x.device) if mask is None else mask
    positions = (mask.cumsum(-1) - 1).clamp_min(0).float()
    freqs = positions[..., None] * layer.rotary.inv_freq
    q, k = (rotary_embedding_ref(t, freqs.cos(), freqs.sin()) for t in (q, k))
    groups = layer.num_heads // layer.num_kv_heads
    k, v = (repeat(t, "b t h d -> b t (h g) d", g=groups) for t in (k, v))
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
    i, j = torch.arange(T, device=x.device)[:, None], torch.arange(T, device=x.device)[None, :]
    allowed = (j <= i) & ((j > i - layer.window_size) if layer.window_size else True)
    allowed = allowed[None] & mask.bool()[:, None, :] | (i == j)
    o = torch.einsum("bhij,bjhd->bihd", scores.masked_fill(~allowed[:, None], -torch.inf).softmax(-1), v)
    o = o * mask[..., None, None]
    return layer.o_proj(o.flatten(-2))


LAYERS = {
    "mha": dict(num_heads=4),
    "gqa": dict(num_heads=4, num_kv_heads=2),
    "window": dict(num_heads=4, num_kv_heads=1, window_size=5),
}


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """On the GPU the layer's SDPA takes its CUDA kernels (no flash-attn there: FLA's layer needs it)."""
    return torch.device(request.param)


def make_layer(name, device="cpu"):
    return Attention(hidden_size=D, layer_idx=0, **LAYERS[name]).to(device)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("T", [1, 13])
def test_attention_equals_reference(device, name, T):
    layer = make_layer(name, device)
    x = torch.randn(2, T, D, device=device)
    assert_close("y", layer(x)[0], reference(layer, x), 1e-5)


@pytest.mark.parametrize("name", LAYERS)
def test_left_padded_batch_equals_per_sequence_runs(device, name):
    layer = make_layer(name, device)
    lengths, T = [4, 11, 7], 11
    xs = [torch.randn(1, n, D, device=device) for n in lengths]
    x, mask = torch.zeros(3, T, D, device=device), torch.zeros(3, T, dtype=torch.long, device=device)
    for i, (xi, n) in enumerate(zip(xs, lengths)):
        x[i, T - n :], mask[i, T - n :] = xi[0], 1
    y = layer(x, attention_mask=mask)[0]
    assert_close("y vs reference", y, reference(layer, x, mask), 1e-5)
    for i, (xi, n) in enumerate(zip(xs, lengths)):
        assert_close(f"y[{i}]", y[i : i + 1, T - n :], layer(xi)[0], 1e-5)


@pytest.mark.parametrize("name", LAYERS)
def test_packed_sequences_equal_per_sequence_runs(device, name):
    layer = make_layer(name, device)
    lengths = [6, 1, 10]
    xs = [torch.randn(1, n, D, device=device) for n in lengths]
    cu_seqlens = torch.tensor([0, 6, 7, 17], device=device)
    y = layer(torch.cat(xs, 1), cu_seqlens=cu_seqlens)[0]
    for i, xi in enumerate(xs):
        assert_close(f"y[{i}]", y[:, cu_seqlens[i] : cu_seqlens[i + 1]], layer(xi)[0], 1e-5)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("padded", [False, True])
def test_cache_continues_the_sequence(device, name, padded):
    """Prefill then decode one token at a time (the mask growing as in ``generate``) equals one pass."""
    layer = make_layer(name, device).eval()
    T, prefill = 12, 6
    x = torch.randn(2, T, D, device=device)
    mask = torch.ones(2, T, dtype=torch.long, device=device)
    if padded:
        mask[0, :3] = 0
    with torch.no_grad():
        full = layer(x, attention_mask=mask)[0]
        cache = Cache()
        pieces = [layer(x[:, :prefill], attention_mask=mask[:, :prefill], past_key_values=cache, use_cache=True)[0]]
        for t in range(prefill, T):
            step = layer(x[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache, use_cache=True)
            pieces.append(step[0])
    assert_close("y", torch.cat(pieces, 1), full, 1e-5)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(hidden_size=D, num_heads=4, num_kv_heads=3)


def test_mask_and_cache_of_another_batch_are_refused():
    layer = make_layer("mha").eval()
    x = torch.randn(2, 6, D)
    with pytest.raises(ValueError, match="does not fit the input"):
        layer(x, attention_mask=torch.ones(1, 6, dtype=torch.long))
    with torch.no_grad():
        cache = Cache()
        layer(x, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="the cache holds 2 sequences but this call has 3"):
            layer(torch.randn(3, 1, D), past_key_values=cache, use_cache=True)


def test_packed_sequences_cannot_fill_a_cache():
    """The cache keeps a row of keys per sequence; packed ones would share one, and decoding
    would attend across them."""
    layer = make_layer("mha").eval()
    with torch.no_grad(), pytest.raises(ValueError, match="cannot fill an attention layer's cache"):
        layer(torch.randn(1, 10, D), cu_seqlens=torch.tensor([0, 4, 10]), past_key_values=Cache(), use_cache=True)
