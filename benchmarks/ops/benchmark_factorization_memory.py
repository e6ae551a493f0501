"""Speed of dense Factorization Memory against FLA's kernels and SDPA, and of its decoding step.

    python benchmarks/ops/benchmark_factorization_memory.py [--out results/ops] [--quick]
        [--T 2048 4096 16384] [--M 64 128 256] [--ops fm gla ...] [--no-training] [--no-decode] [--no-sparse]

Training table: forward and forward+backward medians (triton.testing.do_bench) at B=4, H=8,
V=64, bf16, T in {2048, 4096, 16384}, M in {64, 128, 256}, for
  fm            chunk_factorization_memory (ours, dense)
  fm_via_gla    the same operator through fla.ops.gla.chunk_gla, q, k, g built in PyTorch
  gla           bare chunk_gla with precomputed inputs (key dim M)
  simple_gla    chunk_simple_gla (key dim M)
  delta_rule    chunk_delta_rule (key dim M)
  sdpa          causal scaled_dot_product_attention (head dim 64)
Sparse table: forward without autograd, forward+backward, and the peak memory of
forward+backward above the inputs, B=4, H=8, V=64, bf16, T in {4096, 16384}, (M, K) in
{(256, 4), (1024, 16), (4096, 16), (1024, 256)} beside dense M = 64 and 256 and FM through
chunk_gla at M = 256, and (4096, 16) given each token's picks and their logits (``topk_indices``:
no [B, T, H, M] logits, nor their gradient).
Decode table: one token at B=64, H=8, V=64, fp32 state, dense at M in {64, 256} and sparse at
(M, K) in {(1024, 16), (4096, 16)} (state updated in place), ours against fused_recurrent_gla
with the equivalent q, k, g (an M-wide state) and, dense, against a plain copy of the state (the
floor of any step that reads and writes it): kernel time per step under CUDA-graph replay of 16
steps, each on fresh inputs and a state of its own (as the kernels follow each other in a
model's decode graph), beside the replay of a one-step graph (which adds that graph's launch),
eager wall time of the public function, and achieved bandwidth (of the bytes each step must
move: for sparse, the M logits and K rows read and written per head).
Kernels that fail on the installed Triton are reported with their error, not dropped.
Prints the tables, writes CSV (rewritten after every row, so that a run stopped early keeps
what it measured) and a PNG, and names the GPU.
"""

import argparse
import csv
import os
import time

import torch
import torch.nn.functional as F
import triton

from fla_factmem.ops import chunk_factorization_memory, fused_recurrent_factorization_memory
from fla_factmem.ops.factorization_memory.chunk_torch import DECAY_FLOOR
from fla_factmem.ops.factorization_memory.routing import update_and_merge_weights


def fm_weights(logits, eta, mu):
    """(q, k, g) of the GLA route: phi, theta and log(1 - theta), built in PyTorch."""
    theta, phi = update_and_merge_weights(logits, eta, mu, None, torch.float32)
    return phi, theta, torch.log(1 - theta + DECAY_FLOOR)


def training_cases(B, T, H, M, V, dtype):
    """The training table's ops at one shape: {name: forward callable}, and every leaf tensor that
    their backwards write gradients to."""
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    dev = "cuda"

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dtype).requires_grad_()

    v = leaf(B, T, H, V)
    logits = leaf(B, T, H, M, scale=2.0)
    eta = torch.rand(B, T, H, device=dev, dtype=dtype).requires_grad_()
    mu = torch.rand(B, T, H, device=dev, dtype=dtype).requires_grad_()
    q, k = leaf(B, T, H, M, scale=0.1), leaf(B, T, H, M, scale=0.1)
    gk = F.logsigmoid(torch.randn(B, T, H, M, device=dev)).div(16).requires_grad_()
    gs = F.logsigmoid(torch.randn(B, T, H, device=dev)).requires_grad_()
    kn = F.normalize(torch.randn(B, T, H, M, device=dev), dim=-1).to(dtype).requires_grad_()
    beta = torch.rand(B, T, H, device=dev, dtype=dtype).requires_grad_()
    qa, ka, va = (leaf(B, H, T, 64) for _ in range(3))

    def fm_via_gla():
        phi, theta, g = fm_weights(logits, eta, mu)
        return chunk_gla(phi.to(dtype), theta.to(dtype), v, g, scale=1.0)[0]

    cases = {
        "fm": lambda: chunk_factorization_memory(v, logits, eta, mu)[0],
        "fm_via_gla": fm_via_gla,
        "gla": lambda: chunk_gla(q, k, v, gk, scale=1.0)[0],
        "simple_gla": lambda: chunk_simple_gla(q, k, v, gs, scale=1.0)[0],
        "delta_rule": lambda: chunk_delta_rule(q, kn, v, beta, scale=1.0)[0],
        "sdpa": lambda: F.scaled_dot_product_attention(qa, ka, va, is_causal=True),
    }
    return cases, [v, logits, eta, mu, q, k, gk, gs, kn, beta, qa, ka, va]


def time_case(fn, leaves):
    """(forward ms, forward+backward ms, error or ''). The leaves' gradients are cleared before
    each timed backward (outside the timing), so that every op's backward writes them afresh
    rather than adding them in place to the last one's: that addition costs each op in
    proportion to its own inputs (bare chunk_gla's q, k and float32 gk against our logits)."""
    try:
        fwd = triton.testing.do_bench(lambda: fn(), warmup=25, rep=100, return_mode="median")
        out = fn()
        grad = torch.randn_like(out)
        both = triton.testing.do_bench(
            lambda: fn().backward(grad), warmup=25, rep=100, return_mode="median", grad_to_none=leaves
        )
        return fwd, both, ""
    except Exception as e:  # a kernel refused or miscompiled by the installed Triton
        return float("nan"), float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def graph_time(fns):
    """Median ms per call of ``fns`` (decode steps, each on inputs and a state of its own)
    captured one after the other in one CUDA graph, per replay divided by their number. With
    one step this is the replay of a one-step graph, whose launch (3 to 6 us on an H200)
    is then part of the time; with several, as in a model's decode graph, the kernels follow
    each other. do_bench clears the L2 cache before each replay, and no step reads what
    another wrote, so the states come from memory as in a model."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median") / len(fns)


def wall_times(fns: dict, rounds: int = 10, n: int = 40) -> dict:
    """Median eager wall time in ms of each call, its host time and a device sync included. The
    calls take turns in rounds, so that drifts in the host's speed (seen between runs on one
    machine) reach all of them alike and their ratios hold."""
    for fn in fns.values():
        for _ in range(10):
            fn()
    torch.cuda.synchronize()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(n):
                start = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}


def decode_step(B, H, M, V, topk):
    """One decode step's inputs and state, and the calls that take them: ``{name: (fn, bytes
    it must move)}``, ours (dense, or sparse with ``topk`` and the state updated in place),
    fused_recurrent_gla with an M-wide state and, dense only, a copy of the state."""
    from fla.ops.gla import fused_recurrent_gla

    dev = "cuda"
    v = torch.randn(B, 1, H, V, device=dev, dtype=torch.bfloat16)
    logits = torch.randn(B, 1, H, M, device=dev, dtype=torch.bfloat16)
    eta = torch.rand(B, 1, H, device=dev, dtype=torch.bfloat16)
    mu = torch.rand(B, 1, H, device=dev, dtype=torch.bfloat16)
    state = torch.randn(B, H, M, V, device=dev)
    phi, theta, g = fm_weights(logits, eta, mu)
    q, k = phi.bfloat16(), theta.bfloat16()
    state_bytes = 2 * state.numel() * 4
    io_bytes = sum(x.numel() * x.element_size() for x in (v, logits, eta, mu)) + v.numel() * 2
    gla = (
        lambda: fused_recurrent_gla(q, k, v, gk=g, scale=1.0, initial_state=state, output_final_state=True),
        state_bytes + io_bytes + 3 * q.numel() * 2,
    )
    if topk is not None:
        ours = torch.randn_like(state)  # updated in place, one K-row gather and scatter per step
        return {
            "fm": (
                lambda: fused_recurrent_factorization_memory(
                    v, logits, eta, mu, topk, ours, True, inplace_final_state=True
                ),
                2 * B * H * topk * V * 4 + io_bytes,
            ),
            "gla_fused_recurrent": gla,
        }
    copy = torch.empty_like(state)
    return {
        "fm": (
            lambda: fused_recurrent_factorization_memory(v, logits, eta, mu, None, state, True),
            state_bytes + io_bytes,
        ),
        "gla_fused_recurrent": gla,
        # the floor of any decode step that reads and writes the whole state
        "state_copy": (lambda: copy.copy_(state), state_bytes),
    }


def decode_cases(B, H, M, V, topk, steps):
    """``{name: ([fn of each of ``steps`` decode steps], bytes a step must move)}``, from
    ``decode_step``: each step on fresh inputs (so a sparse step picks its own rows) and a
    state of its own."""
    made = [decode_step(B, H, M, V, topk) for _ in range(steps)]
    return {name: ([step[name][0] for step in made], nbytes) for name, (_, nbytes) in made[0].items()}


# (M, K) of the decode table; K None is dense
DECODE_CASES = [(64, None), (256, None), (1024, 16), (4096, 16)]
# decode steps in one CUDA graph for the kernel time (graph_time)
DECODE_GRAPH_STEPS = 16
# (M, K, op) of the sparse table, beside dense M = 64 and 256 and FM through chunk_gla at M = 256;
# "fm_given_picks": the op given each token's K picks and their logits, no [B, T, H, M] logits
SPARSE_CASES = [
    (64, None, "fm"), (256, None, "fm"), (256, None, "fm_via_gla"), (256, 4, "fm"), (1024, 16, "fm"),
    (4096, 16, "fm"), (4096, 16, "fm_given_picks"), (1024, 256, "fm"),
]  # fmt: skip


def sparse_case_arg(text: str):
    """``M`` (dense), ``M:K`` (sparse), ``M:K:picks`` (sparse, given picks) or ``M:gla`` (FM through
    chunk_gla) -> an (M, K, op) of SPARSE_CASES."""
    M, _, rest = text.partition(":")
    K, _, picks = rest.partition(":")
    if K == "gla":
        return int(M), None, "fm_via_gla"
    return int(M), int(K) if K else None, "fm_given_picks" if picks == "picks" else "fm"


def random_picks(B, T, H, M, K, device, slice_tokens: int = 1024) -> torch.Tensor:
    """``[B, T, H, K]`` int32: the top K of uniform noise, K distinct rows a token, made
    ``slice_tokens`` tokens at a time (all of ``[B, T, H, M]`` is 8.6 GB at M=4096, T=16384)."""
    return torch.cat(
        [
            torch.rand(B, min(slice_tokens, T - t), H, M, device=device).topk(K).indices
            for t in range(0, T, slice_tokens)
        ],
        1,
    ).int()


def kernel_ms(step, repeats: int = 5) -> float:
    """The GPU time of the kernels ``step`` launches, per call (torch.profiler), to set beside
    its wall time: where the wall time is longer, the host is the bound."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / repeats / 1e3


def sparse_case(B, T, H, M, V, topk, op):
    """(forward ms without autograd, forward+backward ms, the forward+backward's kernel time in
    ms, peak MB of forward+backward above the inputs, error or '') of ``op``: "fm", our op, dense
    (``topk`` None) or sparse; "fm_given_picks", sparse, given each token's picks and their
    logits (``[B, T, H, K]`` each); "fm_via_gla", FM through chunk_gla (dense). The peak counts
    everything the step allocates, the gradients of the inputs included (dlogits alone is
    B T H M bf16 but for given picks)."""
    dev, dtype = "cuda", torch.bfloat16
    v = torch.randn(B, T, H, V, device=dev, dtype=dtype).requires_grad_()
    picks = random_picks(B, T, H, M, topk, dev) if op == "fm_given_picks" else None
    logits = (torch.randn(B, T, H, M if picks is None else topk, device=dev) * 2).to(dtype).requires_grad_()
    eta = torch.rand(B, T, H, device=dev, dtype=dtype).requires_grad_()
    mu = torch.rand(B, T, H, device=dev, dtype=dtype).requires_grad_()
    leaves = [v, logits, eta, mu]
    grad = torch.randn_like(v)

    def forward():
        if op == "fm_via_gla":
            from fla.ops.gla import chunk_gla

            phi, theta, g = fm_weights(logits, eta, mu)
            return chunk_gla(phi.to(dtype), theta.to(dtype), v, g, scale=1.0)[0]
        if picks is not None:
            return chunk_factorization_memory(v, logits, eta, mu, topk_indices=picks, num_memories=M)[0]
        return chunk_factorization_memory(v, logits, eta, mu, topk)[0]

    def prefill():
        with torch.no_grad():
            return forward()

    try:
        fwd = triton.testing.do_bench(prefill, warmup=25, rep=100, return_mode="median")
        both = triton.testing.do_bench(
            lambda: forward().backward(grad), warmup=25, rep=100, return_mode="median", grad_to_none=leaves
        )
        for x in leaves:
            x.grad = None

        def step():
            forward().backward(grad)
            for x in leaves:
                x.grad = None

        kernels = kernel_ms(step)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward().backward(grad)
        torch.cuda.synchronize()
        return fwd, both, kernels, (torch.cuda.max_memory_allocated() - base) / 2**20, ""
    except Exception as e:  # a kernel refused or miscompiled by the installed Triton
        nan = float("nan")
        return nan, nan, nan, nan, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def write_csv(path: str, table_rows: list[dict]) -> None:
    """The table so far to ``path``; rewritten after every row, so that a run stopped early (FLA's
    first autotuning at a shape takes minutes) keeps what it measured."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table_rows[0]))
        w.writeheader()
        w.writerows(table_rows)


def plot_decode(plt, decode: list[dict], gpu: str, path: str) -> None:
    """Bars of the decode table's graph and eager times per (M, K) and op, log scale, to ``path``."""
    cases = list(dict.fromkeys((d["M"], d["K"]) for d in decode))
    ops = list(dict.fromkeys(d["op"] for d in decode))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(ops)
    for ax, key, title in zip(
        axes, ("graph_us", "eager_wall_us"), (f"CUDA graph of {DECODE_GRAPH_STEPS} steps, per step", "eager wall")
    ):
        for i, op in enumerate(ops):
            xs, ys = [], []
            for j, case in enumerate(cases):
                d = next((d for d in decode if (d["M"], d["K"]) == case and d["op"] == op), None)
                if d is not None:
                    xs.append(j + (i - (len(ops) - 1) / 2) * width)
                    ys.append(d[key])
            ax.bar(xs, ys, width, label=op)
        labels = [f"M={M} dense" if K == M else f"M={M} K={K}" for M, K in cases]
        ax.set_xticks(range(len(cases)), labels, fontsize=8)
        ax.set(title=f"decode, B=64 H=8 V=64: {title}", ylabel="us", yscale="log")
        ax.legend(fontsize=7)
    fig.suptitle(gpu)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description="Factorization Memory op benchmarks")
    parser.add_argument("--out", default="results/ops")
    parser.add_argument("--quick", action="store_true", help="T = 4096, M in {64, 256}, ops fm, fm_via_gla, gla")
    parser.add_argument("--T", type=int, nargs="+", help="sequence lengths of the training table")
    parser.add_argument("--M", type=int, nargs="+", help="memory sizes of the training table")
    parser.add_argument(
        "--ops",
        nargs="+",
        choices=["fm", "fm_via_gla", "gla", "simple_gla", "delta_rule", "sdpa"],
        help="ops of the training table (default: all)",
    )
    parser.add_argument("--no-training", action="store_true", help="skip the training table")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode table")
    parser.add_argument("--no-sparse", action="store_true", help="skip the sparse table")
    parser.add_argument(
        "--sparse-cases",
        nargs="+",
        type=sparse_case_arg,
        default=SPARSE_CASES,
        help="cases of the sparse table: M (dense), M:K, M:K:picks (given the picks and their logits), or M:gla "
        "(FM through chunk_gla, whose autotuning takes minutes)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("the op benchmarks time the Triton kernels and need a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu} | torch {torch.__version__} | triton {triton.__version__}")

    # the first timed case otherwise runs at idle clocks (measured 0.63 ms against 0.36 for our
    # M=64 forward when it came first)
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    triton.testing.do_bench(lambda: a @ a, warmup=500, rep=500)

    rows = []
    Ts = args.T or ([4096] if args.quick else [2048, 4096, 16384])
    Ms = args.M or ([64, 256] if args.quick else [64, 128, 256])
    selected_ops = args.ops or (["fm", "fm_via_gla", "gla"] if args.quick else None)
    for T in () if args.no_training else Ts:
        for M in Ms:
            cases, leaves = training_cases(4, T, 8, M, 64, torch.bfloat16)
            for name, fn in cases.items():
                if (name == "sdpa" and M != Ms[0]) or (selected_ops and name not in selected_ops):
                    continue  # sdpa does not depend on M
                fwd, both, err = time_case(fn, leaves)
                rows.append(dict(T=T, M=M, op=name, fwd_ms=fwd, fwd_bwd_ms=both, error=err))
                write_csv(os.path.join(args.out, "training.csv"), rows)
                print(f"T={T:6d} M={M:4d} {name:12s} fwd {fwd:8.3f} ms  fwd+bwd {both:8.3f} ms  {err}", flush=True)
            torch.cuda.empty_cache()

    sparse = []
    for T in () if args.no_sparse else (4096, 16384):
        for M, K, op in args.sparse_cases:
            fwd, both, kernels, peak, err = sparse_case(4, T, 8, M, 64, K, op)
            K = K or M
            sparse.append(
                dict(
                    T=T,
                    M=M,
                    K=K,
                    op=op,
                    fwd_ms=fwd,
                    fwd_bwd_ms=both,
                    fwd_bwd_kernels_ms=kernels,
                    fwd_bwd_peak_MB=peak,
                    error=err,
                )  # fmt: skip
            )
            write_csv(os.path.join(args.out, "sparse.csv"), sparse)
            print(
                f"sparse T={T:6d} M={M:4d} K={K:4d} {op:10s} fwd {fwd:8.3f} ms  fwd+bwd {both:8.3f} ms  "
                f"(kernels {kernels:8.3f} ms)  peak {peak:8.1f} MB  {err}",
                flush=True,
            )
            torch.cuda.empty_cache()

    decode = []
    for M, K in () if args.no_decode else DECODE_CASES:
        cases = decode_cases(64, 8, M, 64, K, steps=DECODE_GRAPH_STEPS)
        walls = wall_times({name: fns[0] for name, (fns, _) in cases.items()})
        for name, (fns, nbytes) in cases.items():
            g_ms, one_ms, w_ms = graph_time(fns), graph_time(fns[:1]), walls[name]
            decode.append(
                dict(
                    M=M,
                    K=K or M,
                    op=name,
                    graph_us=g_ms * 1e3,
                    one_step_graph_us=one_ms * 1e3,
                    eager_wall_us=w_ms * 1e3,
                    GBps=nbytes / (g_ms * 1e-3) / 1e9,
                )
            )
            write_csv(os.path.join(args.out, "decode.csv"), decode)
            print(
                f"decode M={M:4d} K={K or M:4d} {name:20s} graph {g_ms * 1e3:7.1f} us (one-step graph "
                f"{one_ms * 1e3:7.1f})  eager {w_ms * 1e3:7.1f} us  {decode[-1]['GBps']:7.0f} GB/s",
                flush=True,
            )
        del cases, fns  # DECODE_GRAPH_STEPS states of each op: some 27 GB at M = 4096, graph pools included
        torch.cuda.empty_cache()

    ops = list(dict.fromkeys(r["op"] for r in rows))
    if rows:
        print(f"\n## {gpu}: B=4 H=8 V=64 bf16, medians in ms (fwd / fwd+bwd)")
        print("| T | M | " + " | ".join(ops) + " |")
        print("|---|---|" + "---|" * len(ops))
        for T in Ts:
            for M in Ms:
                cells = []
                for op in ops:
                    r = next((r for r in rows if r["T"] == T and r["M"] == M and r["op"] == op), None)
                    cells.append(
                        "-" if r is None else ("fails" if r["error"] else f"{r['fwd_ms']:.3f} / {r['fwd_bwd_ms']:.3f}")
                    )
                print(f"| {T} | {M} | " + " | ".join(cells) + " |")
    if sparse:
        print(f"\n## sparse, B=4 H=8 V=64 bf16 ({gpu}); peak: forward+backward, above the inputs")
        print(
            "| T | M | K | op | forward ms (no grad) | forward+backward ms | its kernels, ms | peak MB |\n"
            "|---|---|---|---|---|---|---|---|"
        )
        for r in sparse:
            print(
                f"| {r['T']} | {r['M']} | {r['K']} | {r['op']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} "
                f"| {r['fwd_bwd_kernels_ms']:.3f} | {r['fwd_bwd_peak_MB']:.0f} |"
            )
    print(f"\n## decode, B=64 H=8 V=64, fp32 state ({gpu}); us per step")
    print(
        f"| M | K | op | CUDA graph of {DECODE_GRAPH_STEPS} steps | one-step CUDA graph | eager wall | GB/s |\n"
        "|---|---|---|---|---|---|---|"
    )
    for d in decode:
        print(
            f"| {d['M']} | {d['K']} | {d['op']} | {d['graph_us']:.1f} | {d['one_step_graph_us']:.1f} "
            f"| {d['eager_wall_us']:.1f} | {d['GBps']:.0f} |"
        )

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if rows:
            plot_T = 4096 if 4096 in Ts else Ts[0]
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for ax, key in zip(axes, ("fwd_ms", "fwd_bwd_ms")):
                for op in ops:
                    pts = [(r["M"], r[key]) for r in rows if r["op"] == op and r["T"] == plot_T and not r["error"]]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=op)
                ax.set(title=f"{key} at B=4 T={plot_T} H=8 V=64 bf16", xlabel="M (key dim)", ylabel="ms")
                ax.legend(fontsize=7)
            fig.suptitle(gpu)
            fig.tight_layout()
            fig.savefig(os.path.join(args.out, "training.png"), dpi=120)
        if sparse:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for ax, key, unit in zip(axes, ("fwd_bwd_ms", "fwd_bwd_peak_MB"), ("ms", "MB")):
                for T in dict.fromkeys(r["T"] for r in sparse):
                    pts = [r for r in sparse if r["T"] == T]
                    names = {"fm_via_gla": "via gla", "fm_given_picks": "picks"}
                    labels = [f"{names.get(r['op'], r['op'])} {r['M']}/{r['K']}" for r in pts]
                    ax.plot(labels, [r[key] for r in pts], marker="o", label=f"T={T}")
                ax.set(title=f"forward+backward {unit}, B=4 H=8 V=64 bf16", xlabel="op M/K", ylabel=unit, yscale="log")
                ax.tick_params(axis="x", rotation=45, labelsize=7)
                ax.legend(fontsize=7)
            fig.suptitle(gpu)
            fig.tight_layout()
            fig.savefig(os.path.join(args.out, "sparse.png"), dpi=120)
        if decode:
            plot_decode(plt, decode, gpu, os.path.join(args.out, "decode.png"))
    except ImportError:
        print("matplotlib missing: no PNG written")


if __name__ == "__main__":
    main()
