"""The sparse (top-K) Triton kernels against the definition: on the CPU through TRITON_INTERPRET=1
at small shapes, on the GPU (``cuda`` marker) at real shapes and in bf16; and the proof that
rows a token does not select are neither read nor written."""

import functools

import pytest
import torch

from fla_factmem import utils
from fla_factmem.ops import (
    chunk_factorization_memory,
    fused_recurrent_factorization_memory,
    naive_factorization_memory,
)
from fla_factmem.ops.factorization_memory import launch
from fla_factmem.ops.factorization_memory.chunk import ChunkSparseFactorizationMemoryFunction
from fla_factmem.ops.factorization_memory.chunk_torch import chunk_factorization_memory_torch
from fla_factmem.ops.factorization_memory.launch import chunk_sparse_fwd, fused_recurrent_fwd, sparse_routing
from fla_factmem.ops.factorization_memory.routing import run_on_weights, top_rows
from tests.ops.factorization_memory.test_kernels import GRAD_TOLERANCES, assert_matches_float64, edge_case_inputs
from tests.utils import GRAD_NAMES, assert_close, assert_matches, make_inputs, offsets_of, run_with_grads

# a quiet NaN with a payload: any arithmetic on it yields the canonical NaN, other bits
POISON_BITS = 0x7FA00001


def float64_reference(v, logits, eta, mu, topk, h0, cu_seqlens=None):
    """The PyTorch chunked path in float64."""
    args = [x.detach().double() if x is not None else None for x in (v, logits, eta, mu, h0)]
    return run_on_weights(chunk_factorization_memory_torch, *args[:4], topk, args[4], True, cu_seqlens)


def detached_inputs(*args, **kwargs):
    return tuple(x.detach() if x is not None else None for x in make_inputs(*args, **kwargs))


def picked_rows(logits, topk):
    """[B, T, H, M] bool: each token's picks, by the op's own rule (ties to the lower rows)."""
    picks = top_rows(logits.detach().float(), topk)[1]
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter_(-1, picks, True)


def selected_rows(logits, topk, cu_seqlens=None):
    """[N, H, M] bool: the rows that some token of each sequence selects."""
    chosen = picked_rows(logits, topk)
    if cu_seqlens is None:
        return chosen.any(1)
    bounds = cu_seqlens.tolist()
    return torch.stack([chosen[0, a:b].any(0) for a, b in zip(bounds[:-1], bounds[1:])])


def poisoned(h0, chosen):
    """h0 with every row no token selects set to the POISON_BITS NaN."""
    poison = torch.tensor(POISON_BITS, dtype=torch.int32).view(torch.float32).to(h0.device)
    return torch.where(chosen[..., None], h0, poison)


# one stage (K = M / 2); two stages with groups of 4, 2, 8 and 16 logits (``top_k_group``); rows
# past 2^16, which 16-bit logits rank with 64-bit keys
@pytest.mark.parametrize(("M", "topk"), [(16, 1), (40, 7), (64, 16), (32, 16), (1000, 16), (4096, 16), (65600, 3)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_routing_kernel(M, topk, ties, dtype):
    check_sparse_routing(M, topk, ties, dtype, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize(("M", "topk"), [(1024, 16), (4096, 64), (65600, 3)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_sparse_routing_kernel(M, topk, ties, dtype):
    check_sparse_routing(M, topk, ties, dtype, "cuda")


def check_sparse_routing(M, topk, ties, dtype, device):
    """The routing kernel's picks are the stable sort's first ``topk`` rows, its alpha their
    softmax."""
    logits = detached_inputs(2, 5, 3, M, 4, with_state=False, device=device)[1].to(dtype)
    if ties:  # few distinct values: the picks among equal logits go to the lower rows
        logits = torch.randint(-3, 4, logits.shape, device=device).to(dtype)
        logits[..., 1::3] *= -1  # -0.0 among the zeros, equal to +0.0
        logits[:, 0, :, ::5] = float("-inf")
        logits[:, 1, :, 2:] = float("-inf")  # fewer finite logits than picks: -inf ones get picked too
    picks = sparse_routing(logits, topk)
    rows = torch.sort(-logits.float(), dim=-1, stable=True).indices[..., :topk]
    assert torch.equal(picks.rows.long(), rows), "the picks, largest logit first, ties to the lower row"
    assert_close("alpha", picks.alpha, logits.float().gather(-1, rows).softmax(-1), 1e-6)


def sparse_chunk_kernels(v, logits, eta, mu, topk, h0, output_final_state, cu_seqlens=None):
    """The sparse Triton forward on any device (the public op takes it on CUDA only), without
    the carries a backward would need."""
    picks = sparse_routing(logits, topk)
    return chunk_sparse_fwd(v, eta, mu, picks, logits.shape[-1], h0, output_final_state, cu_seqlens, False)[:2]


def triton_sparse_chunk(v, logits, eta, mu, topk, initial_state=None, output_final_state=False, cu_seqlens=None):
    """The sparse Triton forward and backward on any device."""
    return ChunkSparseFactorizationMemoryFunction.apply(
        v, logits, eta, mu, topk, None, logits.shape[-1], initial_state, output_final_state, cu_seqlens, True
    )


@pytest.mark.parametrize(
    ("B", "T", "M", "V", "topk"),
    # T = 1; M not a power of 2; K = M - 1. V not a power of 2 and K = M / 4 (M = 64, 128) only in
    # test_sparse_chunk_gradients, whose check starts with o and the final state: CI's time
    [(2, 1, 16, 16, 1), (1, 37, 40, 16, 4), (2, 8, 24, 16, 23)],
)
@pytest.mark.parametrize("with_state", [False, True])
def test_sparse_chunk_forward_matches_definition(B, T, M, V, topk, with_state):
    v, logits, eta, mu, h0 = detached_inputs(B, T, 2, M, V, logit_scale=2.0, with_state=with_state)
    o, ht = sparse_chunk_kernels(v, logits, eta, mu, topk, h0, True)
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, topk, h0, True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


def test_sparse_chunk_forward_varlen():
    offsets = torch.tensor([0, 18, 18, 19, 50], dtype=torch.int32)
    v, logits, eta, mu, h0 = detached_inputs(1, 50, 2, 32, 16, N=4)
    o, ht = sparse_chunk_kernels(v, logits, eta, mu, 4, h0, True, offsets)
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, 4, h0, True, cu_seqlens=offsets)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.parametrize("case", ["overwrite", "eta_zero"])
def test_sparse_chunk_forward_edge_numerics(case):
    """theta = 1 (K = 1 and eta = 1: every pick overwrites its row) and theta = 0."""
    v, logits, eta, mu, h0 = detached_inputs(1, 40, 2, 32, 16)
    eta = torch.ones_like(eta) if case == "overwrite" else torch.zeros_like(eta)
    topk = 1 if case == "overwrite" else 4
    o, ht = sparse_chunk_kernels(v, logits, eta, mu, topk, h0, True)
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, topk, h0, True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.parametrize("cu_seqlens", [None, [0, 18, 40]])
def test_sparse_chunk_forward_never_touches_inactive_rows(cu_seqlens, device="cpu"):
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=device)
    B = 2 if offsets is None else 1
    v, logits, eta, mu, h0 = detached_inputs(B, 40 if offsets is not None else 20, 2, 256, 16, N=2, device=device)
    chosen = selected_rows(logits, 4, offsets)
    assert not chosen.all(), "the test needs rows that no token selects"
    state = poisoned(h0, chosen)
    o, ht = sparse_chunk_kernels(v, logits, eta, mu, 4, state, True, offsets)
    bits, bits_before = ht.view(torch.int32), state.view(torch.int32)
    assert torch.equal(bits[~chosen], bits_before[~chosen]), "an inactive row was written"
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, 4, h0, True, cu_seqlens=offsets)
    assert_close("o (finite: no inactive row was read)", o, o_ref, 1e-5)
    assert_close("active rows", ht[chosen], ht_ref[chosen], 1e-5)


@pytest.mark.parametrize(
    ("B", "T", "M", "V", "topk", "with_state"),
    # T = 1; M not a power of 2; V not a power of 2 and K = M / 4 (on few tokens: 9 to 22 rows of
    # the two heads still span two tiles); K = M - 1 on 8 tokens; K = 1 over runs of many tiles.
    # Each with and without an initial state, but for M = 128 (CI's time: 40 s in the interpreter)
    [(*case, with_state) for case in
     [(2, 1, 16, 16, 1), (1, 37, 40, 16, 4), (1, 24, 64, 20, 16), (1, 21, 128, 16, 32), (2, 8, 24, 16, 23),
      (1, 50, 32, 16, 1)]
     for with_state in (False, True) if with_state or case[2] != 128],
)  # fmt: skip
def test_sparse_chunk_gradients(B, T, M, V, topk, with_state):
    inputs = make_inputs(B, T, 2, M, V, logit_scale=2.0, with_state=with_state)
    assert_matches(triton_sparse_chunk, naive_factorization_memory, inputs, topk, 1e-5, 1e-4)


@pytest.mark.parametrize("with_state", [False, True])
def test_sparse_chunk_gradients_over_blocks_of_columns(with_state, monkeypatch):
    """V over more than one program's block of columns (here 3 of 32, the last partly masked; on
    the GPU V > 256): each block's parts of dtheta and dphi summed."""
    monkeypatch.setattr(launch, "SPARSE_BLOCK_V", 32)
    inputs = make_inputs(1, 20, 2, 40, 80, logit_scale=2.0, with_state=with_state)
    assert_matches(triton_sparse_chunk, naive_factorization_memory, inputs, 4, 1e-5, 1e-4)


def test_sparse_chunk_gradients_varlen():
    offsets = torch.tensor([0, 18, 18, 19, 60], dtype=torch.int32)
    inputs = make_inputs(1, 60, 2, 32, 16, N=4)
    assert_matches(triton_sparse_chunk, naive_factorization_memory, inputs, 4, 1e-5, 1e-4, cu_seqlens=offsets)


def test_sparse_chunk_keeps_nothing_of_size_m():
    """What the op keeps for the backward besides v, eta, mu and the initial state: the picks as
    events along the rows (T * K values per head) and the memory entering each tile of
    ``SPARSE_TILE`` events (T * K * V / SPARSE_TILE values per head); nothing that grows with
    M, not even the logits."""

    def kept(M, V, T=40, topk=8):
        v, logits, eta, mu, h0 = make_inputs(1, T, 2, M, V)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
            triton_sparse_chunk(v, logits, eta, mu, topk, h0)
        assert all(x is not logits for x in saved), "the logits were kept"
        inputs = {id(x) for x in (v, eta, mu, h0)}
        return sum(x.numel() for x in saved if id(x) not in inputs)

    assert 0 < kept(64, 16) == kept(256, 16)
    tiles_per_head = -(-40 * 8 // launch.SPARSE_TILE)
    assert kept(64, 48) - kept(64, 16) == 2 * tiles_per_head * (48 - 16)


@pytest.mark.parametrize("events_per_program", [1, 40, launch.SPARSE_EVENTS_PER_PROGRAM])
@pytest.mark.parametrize(("M", "offsets"), [(24, None), (24, [0, 70, 71, 120]), (30000, [0, 3, 130])])
def test_sparse_events_and_block_bounds(events_per_program, M, offsets, monkeypatch):
    """16-bit sort keys (M = 24) and 32-bit ones (M = 30000); varlen with tokens past the last
    offset; blocks of one event up to the default."""
    monkeypatch.setattr(launch, "SPARSE_EVENTS_PER_PROGRAM", events_per_program)
    check_sparse_events(1, 130, 3, M, 4, offsets, "cpu")


@pytest.mark.parametrize("events_per_program", [1, 2, 1024])
def test_sparse_events_block_bounds_at_the_edges(events_per_program, monkeypatch):
    """Searches over every step of the binary search (one event per block, all tokens but the
    first past the last offset) and blocks longer than all events."""
    monkeypatch.setattr(launch, "SPARSE_EVENTS_PER_PROGRAM", events_per_program)
    check_sparse_events(1, 8, 1, 24, 1, [0, 1], "cpu")
    check_sparse_events(1, 130, 2, 24, 4, None, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize(("B", "M", "offsets"), [(4, 1024, None), (1, 4096, [0, 5, 3000, 4000])])
def test_cuda_sparse_events_and_block_bounds(B, M, offsets):
    check_sparse_events(B, 4096, 8, M, 16, offsets, "cuda")


def check_sparse_events(B, T, H, M, K, offsets, device):
    """The events are the picks sorted by (sequence, row), in token order within a row, with
    their theta and phi; block j of a head starts where the row holding its event j S starts, or
    where that row started at or before event (j - 1) S, at the tile of event j S (a split row), and
    the blocks end before the tokens past the last offset. Rows 0 and 1 are hot."""
    _, logits, eta, mu, _ = detached_inputs(B, T, H, M, 1, with_state=False, device=device)
    logits[..., :2] += 6.0
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device) if offsets is not None else None
    routing = sparse_routing(logits, K)
    events = launch.sparse_events(routing, eta, mu, M, cu_seqlens)

    N, S = (B if offsets is None else len(offsets) - 1), launch.SPARSE_EVENTS_PER_PROGRAM
    tokens = torch.arange(B * T, device=device)
    sequence = tokens // T if offsets is None else torch.searchsorted(cu_seqlens[1:], tokens.int(), right=True)
    rows = routing.rows.long().reshape(B * T, H, K)
    keys = (sequence[:, None, None] * M + rows).permute(1, 0, 2).reshape(H, -1)
    picks = (tokens[:, None, None] * H + torch.arange(H, device=device)[:, None]) * K + torch.arange(K, device=device)
    ref_keys, order = torch.sort(keys, stable=True)
    ref_picks = picks.permute(1, 0, 2).reshape(H, -1).gather(1, order)
    # each key shifted left by 2 over its run's start (bit 0) and end (bit 1) flags
    pad = torch.full((H, 1), -1, device=device)
    first = ref_keys != torch.cat([pad, ref_keys[:, :-1]], 1)
    last = ref_keys != torch.cat([ref_keys[:, 1:], pad], 1)
    assert torch.equal(events.keys.long(), ref_keys * 4 + first.long() + 2 * last.long())
    assert torch.equal(events.picks.long(), ref_picks)
    alpha = routing.alpha.reshape(-1)[ref_picks]
    assert torch.equal(events.theta, eta.float().reshape(-1)[ref_picks // K] * alpha)
    assert torch.equal(events.phi, mu.float().reshape(-1)[ref_picks // K] * alpha)
    at = torch.cat([ref_keys[:, ::S].clamp(max=N * M), torch.full((H, 1), N * M, device=device)], 1)
    row_starts = torch.searchsorted(ref_keys, at)
    # a row that holds events (j - 1) S and j S is split at the tile of event j S, if that starts after the row
    E = ref_keys.shape[1]
    j = torch.arange(at.shape[1], device=device)
    tile_start = j * S // launch.SPARSE_TILE * launch.SPARSE_TILE
    key_at, key_before = (ref_keys[:, (i * S).clamp(0, E - 1)] for i in (j, j - 1))
    split = (j > 0) & (j * S < E) & (key_at < N * M) & (key_before == key_at) & (tile_start > row_starts)
    assert torch.equal(events.block_bounds.long(), torch.where(split, tile_start, row_starts))


@pytest.mark.parametrize(
    "events_per_program, lengths",
    [(3, [30, 1, 24]), (40, [70, 1, 59]), (launch.SPARSE_EVENTS_PER_PROGRAM, [30, 1, 24])],
)
def test_sparse_chunk_rows_across_tiles_and_programs(events_per_program, lengths, monkeypatch):
    """Routing concentrated on a few rows (each picked by nearly every token: runs of events far
    longer than a tile) and other rows picked now and then, in blocks shorter than a tile (the
    hot rows split at every tile, with empty blocks between their pieces), of 40 events (split
    rows) and of the default (whole rows): the memory carried from tile to tile and from piece
    to piece, forward and backward, and the blocks' bounds. Blocks of 3 events and of the default
    take shorter sequences (CI's time: the interpreter's time grows with the number of programs
    and events): hot rows of up to 29 events there still span 4 tiles, and with blocks of 3 some 10
    blocks, with empty blocks between."""
    monkeypatch.setattr(launch, "SPARSE_EVENTS_PER_PROGRAM", events_per_program)
    offsets = offsets_of(lengths).to(torch.int32)
    v, logits, eta, mu, h0 = make_inputs(1, sum(lengths), 2, 24, 16, N=3)
    with torch.no_grad():
        logits[..., :3] += 6.0  # rows 0-2 lead almost every token's picks
    assert_matches(triton_sparse_chunk, naive_factorization_memory, (v, logits, eta, mu, h0), 5, 1e-5, 1e-4,
                   cu_seqlens=offsets)  # fmt: skip


@pytest.mark.parametrize("events_per_program", [3, 16])
def test_sparse_backward_reads_only_stored_carries(events_per_program, monkeypatch):
    """The carry slots the forward leaves unwritten (each block's first tile, unless its first
    row began in the block before; torch.empty on the GPU) set to NaN change nothing: the
    backward loads only the carries the forward stored, at blocks whose first event lies
    anywhere in a tile. The picks are laid out, not drawn: rows 0-1 are every token's first two
    (runs over many tiles, split between blocks) and rows 2-8 take the third in runs of 5 to 12
    tokens, so that blocks start at rows that begin on a tile's first event and inside one (drawn
    picks left none past the first in some draws: CI's seed 4081162129)."""
    monkeypatch.setattr(launch, "SPARSE_EVENTS_PER_PROGRAM", events_per_program)
    v, logits, eta, mu, h0 = detached_inputs(1, 60, 2, 24, 16)
    third = 2 + torch.arange(7).repeat_interleave(torch.tensor([8, 5, 11, 8, 8, 12, 8]))
    logits[..., :2] += 20.0
    logits[0, torch.arange(60), :, third] += 10.0
    _, _, events, carries = chunk_sparse_fwd(v, eta, mu, sparse_routing(logits, 3), 24, h0, False, None)
    BP = launch.SPARSE_TILE
    stored = torch.zeros(carries.shape[:2], dtype=torch.bool)
    for head, bounds in enumerate(events.block_bounds.tolist()):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            began_before = lo < hi and events.keys[head, lo] & 1 == 0
            stored[head, lo // BP + (0 if began_before else 1) : -(-hi // BP)] = True
    assert (~stored).sum() > stored.shape[0], "the test needs blocks past the first that start inside a tile"
    do, dht = torch.randn_like(v), torch.randn_like(h0)
    grads = [
        launch.chunk_sparse_bwd(v, eta, mu, 24, logits.dtype, events, torch.where(stored[..., None], carries, fill),
                                h0, do, dht, None, True)
        for fill in (0.0, float("nan"))
    ]  # fmt: skip
    for name, a, b in zip(("dv", "dlogits", "deta", "dmu", "dh0"), *grads):
        assert torch.equal(a, b), f"{name}: the backward read a carry the forward did not store"


def test_sparse_scans_read_only_the_pieces_they_wrote(monkeypatch):
    """Split rows' piece slots that no summary wrote (torch.empty on the GPU) set to NaN change
    nothing, forward or backward: the scans chain only written pieces, through the empty blocks
    between them (blocks of 3 events, hot rows split at every tile)."""
    monkeypatch.setattr(launch, "SPARSE_EVENTS_PER_PROGRAM", 3)
    inputs = make_inputs(1, 40, 2, 24, 16, with_state=True)
    with torch.no_grad():
        inputs[1][..., :2] += 6.0  # rows 0-1 picked by nearly every token
    clean = run_with_grads(triton_sparse_chunk, inputs, 3)
    pieces_of = launch.split_row_pieces
    monkeypatch.setattr(launch, "split_row_pieces", lambda *a: tuple(x.fill_(float("nan")) for x in pieces_of(*a)))
    assert_rerun_identical(inputs, clean, "read a piece no summary wrote")


def assert_rerun_identical(inputs, clean, reason):
    """The sparse op rerun on ``inputs`` with ``clean``'s (``run_with_grads``'s, top 3) output and
    final state gradients gives bit-identical outputs and gradients; else ``reason``."""
    rerun = run_with_grads(triton_sparse_chunk, inputs, 3, dout=clean[3], dht=clean[4])
    for name, a, b in zip(("o", "final state", *GRAD_NAMES), [*rerun[:2], *rerun[2]], [*clean[:2], *clean[2]]):
        assert torch.equal(a, b), f"{name} {reason}"


def fill_event_padding(events, fill_float, fill_int):
    """Writes ``fill_*`` into the ``launch.EVENT_PADDING`` elements before and after each event array."""
    pad = launch.EVENT_PADDING
    for x in (events.keys, events.picks, events.theta, events.phi):
        start, end = x.storage_offset(), x.storage_offset() + x.numel()
        buffer = torch.as_strided(x, (end + pad,), (1,), 0)
        fill = fill_float if x.is_floating_point() else fill_int
        buffer[start - pad : start].fill_(fill)
        buffer[end:].fill_(fill)
    return events


@pytest.mark.parametrize("events_per_program", [3, 40])
def test_sparse_scans_ignore_what_lies_around_the_events(events_per_program, monkeypatch):
    """The kernels read whole tiles of events unmasked, up to a tile past a head's last event
    (into the next head's events and the buffers' padding): NaN and -1 around the events change
    nothing, forward or backward, with T K not a multiple of a tile."""
    monkeypatch.setattr(launch, "SPARSE_EVENTS_PER_PROGRAM", events_per_program)
    inputs = make_inputs(1, 11, 2, 24, 16, logit_scale=2.0, with_state=True)
    clean = run_with_grads(triton_sparse_chunk, inputs, 3)
    events_of = launch.sparse_events
    monkeypatch.setattr(launch, "sparse_events", lambda *a: fill_event_padding(events_of(*a), float("nan"), -1))
    assert_rerun_identical(inputs, clean, "read the events' padding or another head's events")


def test_sparse_backward_pads_events_that_lost_their_padding(monkeypatch):
    """Events whose arrays lost the padding the scans read into (copied by a saved-tensor hook)
    are copied into padded buffers, once said: the same gradients."""
    monkeypatch.setattr(utils, "_warned", set())
    v, logits, eta, mu, h0 = detached_inputs(1, 30, 2, 24, 16)
    _, _, events, carries = chunk_sparse_fwd(v, eta, mu, sparse_routing(logits, 3), 24, h0, False, None)
    copied = events._replace(**{name: getattr(events, name).clone() for name in ("keys", "picks", "theta", "phi")})
    assert not launch.has_event_padding(copied.keys)
    do, dht = torch.randn_like(v), torch.randn_like(h0)
    backward = functools.partial(launch.chunk_sparse_bwd, v, eta, mu, 24, logits.dtype)
    expected = backward(events, carries, h0, do, dht, None, True)
    with pytest.warns(UserWarning, match="copies its saved events into padded buffers"):
        got = backward(copied, carries, h0, do, dht, None, True)
    for name, a, b in zip(GRAD_NAMES, got, expected):
        assert torch.equal(a, b), name


def test_sparse_backward_launch_errors():
    """The backward needs the forward's carries, one per tile of events."""
    v, logits, eta, mu, _ = make_inputs(1, 20, 2, 24, 16)
    routing = sparse_routing(logits, 4)
    _, _, events, carries = chunk_sparse_fwd(v, eta, mu, routing, 24, None, False, None)
    backward = functools.partial(launch.chunk_sparse_bwd, v, eta, mu, 24, logits.dtype, events)
    with pytest.raises(ValueError, match="needs the carries"):
        backward(None, None, torch.randn_like(v), None, None, False)
    with pytest.raises(ValueError, match="needs the carries"):
        backward(carries[:, :-1], None, torch.randn_like(v), None, None, False)


@pytest.mark.parametrize(
    ("case", "topk"),
    # overwrite: K = 1 and eta = 1, theta = 1 at every pick; saturating: theta near 1 at the first pick
    [
        ("overwrite", 1),
        ("overwrite", 3),
        ("eta_zero", 4),
        ("near_one_hot", 4),
        ("saturating", 1),
        ("saturating", 4),
        ("top_gap", 4),
    ],
)
def test_sparse_chunk_gradients_edge_numerics(case, topk):
    # against float64: the naive op's float32 autograd loses the top pick's gradient under "top_gap"
    inputs = edge_case_inputs(case, 1, 50, 2, 32, 16, "cpu")
    assert_matches_float64(triton_sparse_chunk, inputs, 1e-5, 1e-4, topk=topk)


@pytest.mark.parametrize("cu_seqlens", [None, [0, 18, 40]])
def test_sparse_chunk_backward_never_touches_inactive_rows(cu_seqlens, device="cpu"):
    """The gradient on rows nobody picks passes from the final to the initial state bit for bit
    (poisoned rows of the final state's gradient come out unchanged: never read, never written),
    and the logits of rows a token does not pick get exactly 0."""
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=device)
    B = 2 if offsets is None else 1
    inputs = make_inputs(B, 40 if offsets is not None else 20, 2, 256, 16, N=2, device=device)
    v, logits, eta, mu, h0 = inputs
    chosen = selected_rows(logits.detach(), 4, offsets)
    assert not chosen.all(), "the test needs rows that no token selects"
    dht = poisoned(torch.randn_like(h0), chosen)
    o, ht = triton_sparse_chunk(v, logits, eta, mu, 4, h0, True, offsets)
    dout = torch.randn_like(o)
    # the gradients go in as they are (a product with them, as in (ht * dht).sum(), would quiet the NaN)
    grads = torch.autograd.grad((o, ht), inputs, (dout, dht))
    dh0 = grads[4]
    assert torch.equal(dh0.view(torch.int32)[~chosen], dht.view(torch.int32)[~chosen]), "an inactive row was touched"
    picked = picked_rows(logits, 4)
    assert torch.equal(grads[1][~picked], torch.zeros_like(grads[1][~picked])), "dlogits outside the picks"
    dht_clean = torch.where(chosen[..., None], dht, 0.0)
    _, _, ref_grads, _, _ = run_with_grads(naive_factorization_memory, inputs, 4, dout, dht_clean, cu_seqlens=offsets)
    for name, g, ref in zip(GRAD_NAMES[:4], grads, ref_grads):
        assert_close(f"{name} (finite: no inactive row was read)", g, ref, 1e-4)
    assert_close("dh0 of active rows", dh0[chosen], ref_grads[4][chosen], 1e-4)


@pytest.mark.parametrize("kernels", ["chunk", "decode"])
@pytest.mark.parametrize("M", [8, 64, 200])
def test_sparse_kernels_break_ties_as_the_definition(kernels, M):
    """Logits of few distinct values, as bf16 ones often are: the kernels and the definition
    pick the same rows among equal logits (the lower ones), so they write the same rows."""
    v, logits, eta, mu, h0 = detached_inputs(1, 6, 2, M, 8)
    logits = torch.randint(-1, 2, logits.shape).float()
    if kernels == "chunk":
        o, ht = sparse_chunk_kernels(v, logits, eta, mu, 4, h0, True)
    else:
        o, ht = fused_recurrent_fwd(v, logits, eta, mu, h0, True, None, 4)
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, 4, h0, True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.parametrize(("T", "M", "topk"), [(1, 16, 1), (3, 40, 4), (6, 64, 16), (4, 128, 32), (2, 24, 23)])
@pytest.mark.parametrize("with_state", [False, True])
def test_sparse_decode_matches_definition(T, M, topk, with_state):
    v, logits, eta, mu, h0 = detached_inputs(2, T, 2, M, 20, logit_scale=2.0, with_state=with_state)
    o, ht = fused_recurrent_fwd(v, logits, eta, mu, h0, True, None, topk)
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, topk, h0, True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)
    if h0 is not None:
        assert not torch.equal(ht, h0), "without inplace_final_state the initial state stays as it was"


def test_sparse_decode_varlen():
    offsets = torch.tensor([0, 3, 3, 4, 9], dtype=torch.int32)
    v, logits, eta, mu, h0 = detached_inputs(1, 9, 2, 32, 16, N=4)
    o, ht = fused_recurrent_fwd(v, logits, eta, mu, h0, True, offsets, 4)
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, 4, h0, True, cu_seqlens=offsets)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


def test_sparse_decode_minus_inf_logits():
    """A row whose logit is -inf can still be among the top K (weight 0); the K rows stay distinct."""
    v, logits, eta, mu, h0 = detached_inputs(1, 2, 1, 16, 8)
    logits[..., 3:] = float("-inf")
    o, ht = fused_recurrent_fwd(v, logits, eta, mu, h0, True, None, 5)
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, 5, h0, True)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.parametrize("cu_seqlens", [None, [0, 2, 7]])
def test_sparse_decode_never_touches_inactive_rows(cu_seqlens, device="cpu"):
    offsets = None if cu_seqlens is None else torch.tensor(cu_seqlens, device=device)
    B, N = (2, 2) if offsets is None else (1, 2)
    v, logits, eta, mu, h0 = detached_inputs(B, 7 if offsets is not None else 3, 2, 64, 16, N=N, device=device)
    chosen = selected_rows(logits, 4, offsets)
    assert not chosen.all(), "the test needs rows that no token selects"
    state = poisoned(h0, chosen)
    before = state.clone()
    o, ht = fused_recurrent_fwd(v, logits, eta, mu, state, True, offsets, 4, inplace_final_state=True)
    assert ht is state
    bits, bits_before = ht.view(torch.int32), before.view(torch.int32)
    assert torch.equal(bits[~chosen], bits_before[~chosen]), "an inactive row was written"
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, 4, h0, True, cu_seqlens=offsets)
    assert_close("o (finite: no inactive row was read)", o, o_ref, 1e-5)
    assert_close("active rows", ht[chosen], ht_ref[chosen], 1e-5)


def test_inplace_final_state_on_the_pytorch_path():
    v, logits, eta, mu, h0 = detached_inputs(2, 5, 2, 16, 8)
    o_ref, ht_ref = fused_recurrent_factorization_memory(v, logits, eta, mu, 4, h0, True)
    state = h0.clone()
    o, ht = fused_recurrent_factorization_memory(v, logits, eta, mu, 4, state, True, inplace_final_state=True)
    assert ht is state
    assert torch.equal(o, o_ref) and torch.equal(ht, ht_ref)
    with torch.inference_mode():  # a state made there, as by a prefill there, is updated outside it too
        state = h0.clone()
    o, ht = fused_recurrent_factorization_memory(v, logits, eta, mu, 4, state, True, inplace_final_state=True)
    assert ht is state and torch.equal(ht, ht_ref)


def test_inplace_final_state_errors():
    v, logits, eta, mu, h0 = detached_inputs(1, 1, 1, 8, 4)
    with pytest.raises(ValueError, match="needs an `initial_state`"):
        fused_recurrent_factorization_memory(v, logits, eta, mu, 2, None, True, inplace_final_state=True)
    with pytest.raises(ValueError, match="contiguous float32"):
        fused_recurrent_factorization_memory(v, logits, eta, mu, 2, h0.double(), True, inplace_final_state=True)
    with pytest.raises(ValueError, match="without autograd"):
        fused_recurrent_factorization_memory(v, logits, eta, mu, 2, h0.requires_grad_(), True, inplace_final_state=True)


# ---------------------------------------------------------------- GPU, real shapes


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("B", "T", "M", "topk"),
    [(2, 1000, 1024, 16), (1, 2049, 4096, 16), (1, 300, 4096, 64), (1, 257, 1024, 256), (2, 100, 256, 1)],
)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_sparse_chunk_forward(B, T, M, topk, dtype, tol):
    v, logits, eta, mu, h0 = detached_inputs(B, T, 4, M, 64, dtype=dtype, device="cuda", logit_scale=2.0)
    with torch.no_grad():
        o, ht = chunk_factorization_memory(v, logits, eta, mu, topk, h0, True)
    o_ref, ht_ref = float64_reference(v, logits, eta, mu, topk, h0)
    assert o.dtype == dtype
    assert_close("o", o, o_ref, tol)
    assert_close("final state", ht, ht_ref, tol)


@pytest.mark.cuda
def test_cuda_sparse_chunk_forward_varlen_and_inactive_rows():
    test_sparse_chunk_forward_never_touches_inactive_rows([0, 18, 40], device="cuda")
    offsets = torch.tensor([0, 700, 701, 701, 2000, 2100], device="cuda")
    v, logits, eta, mu, h0 = detached_inputs(1, 2100, 4, 1024, 64, device="cuda", N=5)
    with torch.no_grad():
        o, ht = chunk_factorization_memory(v, logits, eta, mu, 16, h0, True, cu_seqlens=offsets)
    o_ref, ht_ref = float64_reference(v, logits, eta, mu, 16, h0, offsets)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize(("M", "topk"), [(1024, 16), (4096, 16), (4096, 64), (1024, 256), (256, 1)])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_sparse_decode(M, topk, T, dtype, tol):
    v, logits, eta, mu, h0 = detached_inputs(16, T, 8, M, 64, dtype=dtype, device="cuda")
    state = h0.clone()
    version = state._version
    o, ht = fused_recurrent_factorization_memory(v, logits, eta, mu, topk, state, True, inplace_final_state=True)
    assert ht is state and state._version > version
    o_ref, ht_ref = float64_reference(v, logits, eta, mu, topk, h0)
    assert_close("o", o, o_ref, tol)
    assert_close("final state", ht, ht_ref, tol)


@pytest.mark.cuda
def test_cuda_sparse_decode_never_touches_inactive_rows():
    test_sparse_decode_never_touches_inactive_rows([0, 2, 7], device="cuda")


@pytest.mark.cuda
def test_cuda_sparse_decode_varlen():
    offsets = torch.tensor([0, 1, 1, 9, 10], device="cuda")
    v, logits, eta, mu, h0 = detached_inputs(1, 10, 4, 1024, 64, device="cuda", N=4)
    o, ht = fused_recurrent_factorization_memory(v, logits, eta, mu, 16, h0, True, cu_seqlens=offsets)
    o_ref, ht_ref = float64_reference(v, logits, eta, mu, 16, h0, offsets)
    assert_close("o", o, o_ref, 1e-5)
    assert_close("final state", ht, ht_ref, 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("B", "T", "M", "topk", "V"),
    # V = 256: the width of the 340M speed benchmarks' heads; V = 320: two blocks of columns
    [(2, 1000, 1024, 16, 64), (1, 700, 4096, 16, 64), (1, 300, 4096, 64, 64), (1, 257, 1024, 256, 64),
     (2, 100, 256, 1, 64), (1, 300, 1024, 16, 256), (1, 200, 256, 16, 320)],
)  # fmt: skip
@pytest.mark.parametrize(("dtype", "fwd_tol", "bwd_tol"), GRAD_TOLERANCES)
def test_cuda_sparse_chunk_backward(B, T, M, topk, V, dtype, fwd_tol, bwd_tol):
    inputs = make_inputs(B, T, 4, M, V, dtype=dtype, device="cuda", logit_scale=2.0)
    assert_matches_float64(chunk_factorization_memory, inputs, fwd_tol, bwd_tol, topk=topk)


@pytest.mark.cuda
def test_cuda_sparse_chunk_backward_varlen_and_inactive_rows():
    test_sparse_chunk_backward_never_touches_inactive_rows([0, 18, 40], device="cuda")
    offsets = torch.tensor([0, 700, 701, 701, 2000, 2100], device="cuda")
    inputs = make_inputs(1, 2100, 4, 1024, 64, device="cuda", N=5)
    assert_matches_float64(chunk_factorization_memory, inputs, 1e-5, 1e-4, cu_seqlens=offsets, topk=16)


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("case", "topk"),
    [("overwrite", 1), ("overwrite", 16), ("eta_zero", 16), ("near_one_hot", 16), ("saturating", 1), ("top_gap", 16)],
)
def test_cuda_sparse_chunk_backward_edge_numerics(case, topk):
    inputs = edge_case_inputs(case, 1, 2048, 2, 1024, 64, "cuda")
    assert_matches_float64(chunk_factorization_memory, inputs, 1e-5, 1e-4, topk=topk)


@pytest.mark.cuda
def test_cuda_sparse_chunk_concentrated_routing():
    """Rows picked by nearly every token, beside rarely picked ones: rows of up to 1200 events,
    far longer than a block of events, across many tiles and concurrent programs."""
    offsets = torch.tensor([0, 1200, 2000], device="cuda")
    inputs = make_inputs(1, 2000, 4, 1024, 64, device="cuda", N=2)
    with torch.no_grad():
        inputs[1][..., :16] += 6.0
    assert_matches_float64(chunk_factorization_memory, inputs, 1e-5, 1e-4, cu_seqlens=offsets, topk=16)
