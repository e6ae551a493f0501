"""The FactorizationMemory layer: against a direct composition of its projections and the
naive op, padded and packed batches against per-sequence runs, both modes, and the cache."""

import pytest
import torch
import torch.nn.functional as F
from fla.models.cache_utils import Cache

from fla_factmem.layers import FactorizationMemory
from fla_factmem.ops import naive_factorization_memory
from tests.utils import assert_close, offsets_of

D, H, V, M = 32, 2, 8, 6


def make_layer(topk=None, use_short_conv=True, mode="chunk", **kwargs):
    layer = FactorizationMemory(
        hidden_size=D,
        num_heads=H,
        head_dim=V,
        num_memories=M,
        topk=topk,
        temperature=0.7,
        use_short_conv=use_short_conv,
        mode=mode,
        layer_idx=0,
        **kwargs,
    )
    with torch.no_grad():  # non-trivial norm weight and rate biases, so the test sees them
        layer.g_norm.weight.normal_()
        layer.eta_mu_bias.normal_()
    return layer


def projection_weights(layer, stacked=None):
    """The SPEC's W_v, W_z, W_alpha and [W_eta; W_mu] in the order the layer documents them
    stacked in ``in_proj``: views of its weight, or of ``stacked``, a tensor of the weight's shape
    (its gradient)."""
    H, V, M = layer.num_heads, layer.head_dim, layer.num_memories
    return (layer.in_proj.weight if stacked is None else stacked).split([H * V, H * V, H * M, 2 * H])


def compose(layer, x):
    """The layer written out from SPEC section 4 with the naive op."""
    H, V, M = layer.num_heads, layer.head_dim, layer.num_memories
    w_v, w_z, w_alpha, w_rates = projection_weights(layer)
    v = F.linear(x, w_v)
    if layer.use_short_conv:
        conv = layer.v_conv1d
        v = F.conv1d(F.pad(v.transpose(1, 2), (layer.conv_size - 1, 0)), conv.weight, conv.bias, groups=v.shape[-1])
        v = v.transpose(1, 2)
    v = F.silu(v).unflatten(-1, (H, V))
    logits = F.linear(x, w_alpha).unflatten(-1, (H, M)) / layer.temperature
    (w_eta, w_mu), (b_eta, b_mu) = w_rates.chunk(2), layer.eta_mu_bias.chunk(2)
    eta, mu = torch.sigmoid(F.linear(x, w_eta, b_eta)), torch.sigmoid(F.linear(x, w_mu, b_mu))
    o, _ = naive_factorization_memory(v, logits, eta, mu, topk=layer.topk)
    o = o.flatten(-2)
    o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + layer.g_norm.eps) * layer.g_norm.weight
    return layer.o_proj(o * F.silu(F.linear(x, w_z)))


@pytest.mark.parametrize("topk", [None, 1, 3, M])
@pytest.mark.parametrize("use_short_conv", [True, False])
@pytest.mark.parametrize("T", [1, 19, 70])
def test_layer_equals_composition_of_projections_and_naive_op(topk, use_short_conv, T):
    layer = make_layer(topk, use_short_conv)
    x = torch.randn(2, T, D, requires_grad=True)
    y, attentions, cache = layer(x)
    assert attentions is None and cache is None
    ref = compose(layer, x)
    assert_close("y", y, ref, 1e-5)
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad((y * g).sum(), x)
    (dx_ref,) = torch.autograd.grad((ref * g).sum(), x)
    assert_close("dx", dx, dx_ref, 1e-5)
    with torch.no_grad():  # decoding's path up to 64 tokens: one GEMM, its outputs read in place
        assert_close("y without autograd", layer(x)[0], ref, 1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_per_sequence_runs(side):
    layer = make_layer(topk=2)
    lengths = [7, 3, 12]
    xs = [torch.randn(1, n, D) for n in lengths]
    T = max(lengths)
    x = torch.zeros(len(xs), T, D)
    mask = torch.zeros(len(xs), T, dtype=torch.long)
    for i, (xi, n) in enumerate(zip(xs, lengths)):
        span = slice(T - n, T) if side == "left" else slice(0, n)
        x[i, span], mask[i, span] = xi[0], 1
    y, _, _ = layer(x, attention_mask=mask)
    for i, (xi, n) in enumerate(zip(xs, lengths)):
        span = slice(T - n, T) if side == "left" else slice(0, n)
        assert_close(f"y[{i}]", y[i : i + 1, span], layer(xi)[0], 1e-5)
        assert torch.all(y[i, mask[i] == 0] == 0)


@pytest.mark.parametrize("topk", [None, 2])
def test_fully_padded_row_gives_zeros_and_leaves_the_others(topk):
    layer = make_layer(topk)
    x = torch.randn(3, 7, D)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1] = 0
    y, _, _ = layer(x, attention_mask=mask)
    assert torch.all(y[1] == 0)
    assert_close("other rows", y[[0, 2]], layer(x[[0, 2]])[0], 1e-5)


@pytest.mark.parametrize("topk", [None, 2])
def test_all_padding_gives_zeros(topk):
    """Every row padding (the ops refuse T = 0 after unpadding): zeros, as for one padded row."""
    y, _, _ = make_layer(topk)(torch.randn(2, 5, D), attention_mask=torch.zeros(2, 5, dtype=torch.long))
    assert y.shape == (2, 5, D) and torch.all(y == 0)


def test_cu_seqlens_equals_per_sequence_runs():
    layer = make_layer()
    lengths = [5, 1, 66, 9]
    xs = [torch.randn(1, n, D) for n in lengths]
    cu_seqlens = offsets_of(lengths)
    y, _, _ = layer(torch.cat(xs, 1), cu_seqlens=cu_seqlens)
    for i, xi in enumerate(xs):
        assert_close(f"y[{i}]", y[:, cu_seqlens[i] : cu_seqlens[i + 1]], layer(xi)[0], 1e-5)


@pytest.mark.parametrize("topk", [None, 2])
def test_chunk_mode_equals_fused_recurrent_mode(topk):
    chunk = make_layer(topk, mode="chunk")
    recurrent = make_layer(topk, mode="fused_recurrent")
    recurrent.load_state_dict(chunk.state_dict())
    x = torch.randn(2, 80, D)  # longer than the short-input threshold, so each layer keeps its mode
    assert_close("y", recurrent(x)[0], chunk(x)[0], 1e-5)


@pytest.mark.parametrize("topk", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cache_continues_the_sequence(topk, dtype):
    """A prefill then token-by-token decoding through FLA's Cache equals one pass; a float32
    cached state is updated where it lies, a float64 one (which the kernels do not take) replaced."""
    layer = make_layer(topk).eval().to(dtype)
    x = torch.randn(2, 12, D, dtype=dtype)
    with torch.no_grad():
        full = layer(x)[0]
        cache = Cache()
        pieces = [layer(x[:, :5], past_key_values=cache, use_cache=True)[0]]
        prefilled = cache[0]["recurrent_state"]
        for t in range(5, 12):
            pieces.append(layer(x[:, t : t + 1], past_key_values=cache, use_cache=True)[0])
    assert_close("y", torch.cat(pieces, 1), full, 1e-5)
    assert (cache[0]["recurrent_state"] is prefilled) == (dtype == torch.float32)
    assert cache[0]["recurrent_state"].shape == (2, H, M, V)
    assert cache[0]["conv_state"].shape == (2, H * V, 4)
    assert cache.get_seq_length(0) == 12


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_memories=0), "num_memories"),
        (dict(topk=7), "topk"),
        (dict(temperature=0.0), "temperature"),
        (dict(mode="parallel"), "mode"),
        (dict(hidden_size=31, head_dim=None), "divisible"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    base = dict(hidden_size=D, num_heads=H, head_dim=V, num_memories=M)
    with pytest.raises(ValueError, match=message):
        FactorizationMemory(**(base | kwargs))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(routing_slice_tokens=0),
        dict(topk=None),
        dict(topk=M),
        dict(mode="fused_recurrent"),
        dict(load_balance_coef=0.1),
    ],
)
def test_bad_routing_slices_are_refused(kwargs):
    base = dict(hidden_size=D, num_heads=H, head_dim=V, num_memories=M, topk=2, routing_slice_tokens=4)
    with pytest.raises(ValueError, match="routing_slice_tokens"):
        FactorizationMemory(**(base | kwargs))


def sliced_and_whole(topk, slice_tokens, **kwargs):
    """Two layers with the same weights, routing in slices of ``slice_tokens`` tokens and whole."""
    sliced = make_layer(topk, routing_slice_tokens=slice_tokens, **kwargs)
    whole = make_layer(topk, **kwargs)
    whole.load_state_dict(sliced.state_dict())
    return sliced, whole


def assert_same_outputs_and_gradients(layers, x, tol, **kwargs):
    """The layers' outputs, gradients on x and on every parameter agree."""
    results = []
    g = None
    for layer in layers:
        x_leaf = x.detach().clone().requires_grad_()
        y = layer(x_leaf, **kwargs)[0]
        g = torch.randn_like(y) if g is None else g
        params = [p for _, p in sorted(layer.named_parameters())]
        results.append((y, *torch.autograd.grad((y * g).sum(), [x_leaf, *params])))
    names = ["y", "dx", *(name for name, _ in sorted(layers[0].named_parameters()))]
    for name, a, b in zip(names, *results):
        assert_close(name, a, b, tol)


@pytest.mark.parametrize(("topk", "slice_tokens"), [(1, 1), (2, 7), (5, 100)])
def test_sliced_routing_equals_whole_logits(topk, slice_tokens):
    """Routing made a slice of tokens at a time (the memory op given the picks) gives the layer's
    output and every gradient of whole logits, with packed sequences too."""
    layers = sliced_and_whole(topk, slice_tokens)
    assert_same_outputs_and_gradients(layers, torch.randn(2, 19, D), 1e-5)
    assert_same_outputs_and_gradients(layers, torch.randn(1, 30, D), 1e-5, cu_seqlens=offsets_of([9, 1, 20]))


def test_sliced_routing_prefill_continues_in_decoding():
    """A prefill of more than 64 tokens (the chunk op, given the picks) fills the cache that
    token-by-token decoding (whole logits of one token) continues: one pass of whole logits."""
    sliced, whole = (layer.eval() for layer in sliced_and_whole(2, 16))
    x = torch.randn(2, 73, D)
    with torch.no_grad():
        cache = Cache()
        pieces = [sliced(x[:, :70], past_key_values=cache, use_cache=True)[0]]
        for t in range(70, 73):
            pieces.append(sliced(x[:, t : t + 1], past_key_values=cache, use_cache=True)[0])
        assert_close("y", torch.cat(pieces, 1), whole(x)[0], 1e-5)


def test_sliced_routing_with_diagnostics_makes_whole_logits(monkeypatch):
    from fla_factmem import utils

    monkeypatch.setattr(utils, "_warned", set())
    sliced, whole = sliced_and_whole(2, 4, track_routing=True)
    x = torch.randn(2, 9, D)
    with pytest.warns(UserWarning, match="makes whole routing logits despite `routing_slice_tokens`"):
        y = sliced(x)[0]
    assert_close("y", y, whole(x)[0], 1e-5)
    assert sliced.routing_stats.keys() == whole.routing_stats.keys() and sliced.routing_stats


def test_three_dimensional_attention_mask_is_refused():
    with pytest.raises(ValueError, match="padding mask"):
        make_layer()(torch.randn(1, 4, D), attention_mask=torch.ones(1, 4, 4))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk", [None, 3])
def test_layer_on_gpu_equals_composition(dtype, topk):
    """On the GPU the layer runs FLA's modules and the Triton kernels (dense); the composition
    runs under the same autocast, so the two differ only where their kernels round."""
    layer = FactorizationMemory(hidden_size=256, num_heads=4, num_memories=64, topk=topk, layer_idx=0).cuda()
    x = torch.randn(2, 300, 256, device="cuda")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        y = layer(x)[0]
        ref = compose(layer, x)
        with torch.no_grad():  # decoding's path: one GEMM, read in place by the decode kernel
            y_short, ref_short = layer(x[:, :20])[0], compose(layer, x[:, :20])
    assert_close("y", y, ref, tol)
    assert_close("y of 20 tokens without autograd", y_short, ref_short, tol)


@pytest.mark.cuda
def test_sliced_routing_on_gpu_equals_whole_logits():
    """M = 1024, K = 16 under bf16 autocast: the routing kernel picks per slice, the sparse kernels
    take the picks, and the output and gradients are those of whole logits."""
    layers = [
        FactorizationMemory(hidden_size=256, num_heads=4, num_memories=1024, topk=16, routing_slice_tokens=s).cuda()
        for s in (300, None)
    ]
    layers[1].load_state_dict(layers[0].state_dict())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert_same_outputs_and_gradients(layers, torch.randn(2, 1000, 256, device="cuda"), 2e-2)


def test_routing_diagnostics_are_off_by_default_and_measure_collapse():
    layer = make_layer(topk=2)
    x = torch.randn(2, 9, D)
    layer(x)
    assert layer.routing_stats == {}

    layer.track_routing = True
    with torch.no_grad():  # uniform routing: every state takes the same share
        projection_weights(layer)[2].zero_()
    layer(x)
    stats = layer.routing_stats
    assert stats["entropy"].item() == pytest.approx(1.0) and stats["load"].shape == (H, M)
    assert_close("load sums", stats["load"].sum(-1), torch.ones(H), 1e-6)

    dense = make_layer(track_routing=True)
    with torch.no_grad():  # collapse: every token routes to state 0
        w_alpha = projection_weights(dense)[2]
        w_alpha.zero_()
        w_alpha.view(H, M, D)[:, 0] = 5.0
    dense(x.abs() + 1)
    assert dense.routing_stats["entropy"].item() < 0.05
    assert dense.routing_stats["states_used"].item() == pytest.approx(1 / M, rel=0.05)
    assert dense.routing_stats["max_load"].item() == pytest.approx(M, rel=0.05)


def test_routing_summary_averages_layers_in_one_dict():
    from fla_factmem.layers import routing_summary

    layers = torch.nn.ModuleList([make_layer(topk=3, track_routing=True), make_layer(track_routing=True)])
    x = torch.randn(1, 12, D)
    for layer in layers:
        layer(x)
    summary = routing_summary(layers)
    assert set(summary) == {"entropy", "states_used", "max_load"}
    expected = (layers[0].routing_stats["entropy"] + layers[1].routing_stats["entropy"]).item() / 2
    assert summary["entropy"] == pytest.approx(expected)
    assert routing_summary(torch.nn.Linear(2, 2)) == {}


def test_load_balance_loss_trains_the_routing_without_changing_the_output():
    from fla_factmem.layers.routing_diagnostics import affinity, load_balance_loss

    balanced, plain = make_layer(topk=2, load_balance_coef=0.5), make_layer(topk=2)
    plain.load_state_dict(balanced.state_dict())
    x = torch.randn(2, 11, D)
    y_balanced, y_plain = balanced(x)[0], plain(x)[0]
    assert torch.equal(y_balanced, y_plain)
    y_balanced.square().sum().backward()
    y_plain.square().sum().backward()

    # the extra gradient is exactly that of coef * loss with respect to W_alpha, and no other weight's
    weight = projection_weights(plain)[2].detach().requires_grad_()
    logits = (x @ weight.T).unflatten(-1, (H, M)) / plain.temperature
    (extra,) = torch.autograd.grad(0.5 * load_balance_loss(affinity(logits), 2), weight)
    grad_balanced = projection_weights(balanced, balanced.in_proj.weight.grad)
    grad_plain = projection_weights(plain, plain.in_proj.weight.grad)
    assert_close("W_alpha grad", grad_balanced[2], grad_plain[2] + extra, 1e-5)
    for block in (0, 1, 3):  # W_v, W_z, [W_eta; W_mu]
        assert torch.equal(grad_balanced[block], grad_plain[block])
    assert balanced.routing_stats["load_balance_loss"].item() >= 1.0 - 1e-6

    balanced.eval()
    balanced(x)
    assert "load_balance_loss" not in balanced.routing_stats
    with pytest.raises(ValueError, match="sparse routing"):
        make_layer(topk=None, load_balance_coef=0.1)


@pytest.mark.parametrize("shape", [(2, 5), (1, 8), (3, 8)])
def test_padding_mask_must_fit_the_input(shape):
    """A mask of another batch size, or narrower than the input, would make FLA's unpadding pick
    the wrong tokens without an error."""
    with pytest.raises(ValueError, match="does not fit the input"):
        make_layer()(torch.randn(2, 8, D), attention_mask=torch.ones(shape, dtype=torch.long))


def test_cache_of_another_batch_is_refused():
    """Two packed sequences leave two states: the next call must bring two sequences."""
    layer = make_layer().eval()
    with torch.no_grad():
        cache = Cache()
        layer(torch.randn(1, 10, D), cu_seqlens=offsets_of([4, 6]), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="the cache holds 2 sequences but this call has 1"):
            layer(torch.randn(1, 1, D), past_key_values=cache, use_cache=True)
        assert layer(torch.randn(2, 1, D), past_key_values=cache, use_cache=True)[0].shape == (2, 1, D)
