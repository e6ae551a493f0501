"""Speed of dense Factorization Memory against FLA's kernels and SDPA, and of its decoding step.

    python benchmarks/ops/benchmark_factorization_memory.py [--out results/ops] [--quick]
        [--T 2048 4096 16384] [--M 64 128 256] [--ops fm gla ...] [--no-decode]

Training table: forward and forward+backward medians (triton.testing.do_bench) at B=4, H=8,
V=64, bf16, T in {2048, 4096, 16384}, M in {64, 128, 256}, for
  fm            chunk_factorization_memory (ours, dense)
  fm_via_gla    the same operator through fla.ops.gla.chunk_gla, q, k, g built in PyTorch
  gla           bare chunk_gla with precomputed inputs (key dim M)
  simple_gla    chunk_simple_gla (key dim M)
  delta_rule    chunk_delta_rule (key dim M)
  sdpa          causal scaled_dot_product_attention (head dim 64)
Decode table: one token at B=64, H=8, V=64, M in {64, 256}, fp32 state, ours against
fused_recurrent_gla with the equivalent q, k, g and against a plain copy of the state (the floor
of any step that reads and writes it): kernel time under CUDA-graph replay, eager wall time of
the public function, and achieved bandwidth.
Kernels that fail on the installed Triton are reported with their error, not dropped.
Prints the tables, writes CSV and a PNG, and names the GPU.
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

    return {
        "fm": lambda: chunk_factorization_memory(v, logits, eta, mu)[0],
        "fm_via_gla": fm_via_gla,
        "gla": lambda: chunk_gla(q, k, v, gk, scale=1.0)[0],
        "simple_gla": lambda: chunk_simple_gla(q, k, v, gs, scale=1.0)[0],
        "delta_rule": lambda: chunk_delta_rule(q, kn, v, beta, scale=1.0)[0],
        "sdpa": lambda: F.scaled_dot_product_attention(qa, ka, va, is_causal=True),
    }


def time_case(fn):
    """(forward ms, forward+backward ms, error or '')."""
    try:
        fwd = triton.testing.do_bench(lambda: fn(), warmup=25, rep=100, return_mode="median")
        out = fn()
        grad = torch.randn_like(out)
        both = triton.testing.do_bench(
            lambda: fn().backward(grad), warmup=25, rep=100, return_mode="median", grad_to_none=None
        )
        return fwd, both, ""
    except Exception as e:  # a kernel refused or miscompiled by the installed Triton
        return float("nan"), float("nan"), f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def graph_time(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")


def wall_time(fn, n=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[n // 2] * 1e3


def decode_cases(B, H, M, V):
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
    copy = torch.empty_like(state)
    io_bytes = sum(x.numel() * x.element_size() for x in (v, logits, eta, mu)) + v.numel() * 2
    return {
        "fm": (
            lambda: fused_recurrent_factorization_memory(v, logits, eta, mu, None, state, True),
            state_bytes + io_bytes,
        ),
        "gla_fused_recurrent": (
            lambda: fused_recurrent_gla(q, k, v, gk=g, scale=1.0, initial_state=state, output_final_state=True),
            state_bytes + io_bytes + 3 * q.numel() * 2,
        ),
        # the floor of any decode step that reads and writes the whole state
        "state_copy": (lambda: copy.copy_(state), state_bytes),
    }


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
    parser.add_argument("--no-decode", action="store_true", help="skip the decode table")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu} | torch {torch.__version__} | triton {triton.__version__}")

    rows = []
    Ts = args.T or ([4096] if args.quick else [2048, 4096, 16384])
    Ms = args.M or ([64, 256] if args.quick else [64, 128, 256])
    selected_ops = args.ops or (["fm", "fm_via_gla", "gla"] if args.quick else None)
    for T in Ts:
        for M in Ms:
            for name, fn in training_cases(4, T, 8, M, 64, torch.bfloat16).items():
                if (name == "sdpa" and M != Ms[0]) or (selected_ops and name not in selected_ops):
                    continue  # sdpa does not depend on M
                fwd, both, err = time_case(fn)
                rows.append(dict(T=T, M=M, op=name, fwd_ms=fwd, fwd_bwd_ms=both, error=err))
                print(f"T={T:6d} M={M:4d} {name:12s} fwd {fwd:8.3f} ms  fwd+bwd {both:8.3f} ms  {err}", flush=True)
            torch.cuda.empty_cache()

    decode = []
    for M in () if args.no_decode else (64, 256):
        for name, (fn, nbytes) in decode_cases(64, 8, M, 64).items():
            g_ms = graph_time(fn)
            w_ms = wall_time(fn)
            decode.append(
                dict(M=M, op=name, graph_us=g_ms * 1e3, eager_wall_us=w_ms * 1e3, GBps=nbytes / (g_ms * 1e-3) / 1e9)
            )
            print(
                f"decode M={M:4d} {name:20s} graph {g_ms * 1e3:7.1f} us  eager {w_ms * 1e3:7.1f} us  "
                f"{decode[-1]['GBps']:7.0f} GB/s",
                flush=True,
            )

    with open(os.path.join(args.out, "training.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    if decode:
        with open(os.path.join(args.out, "decode.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(decode[0]))
            w.writeheader()
            w.writerows(decode)

    print(f"\n## {gpu}: B=4 H=8 V=64 bf16, medians in ms (fwd / fwd+bwd)")
    ops = list(dict.fromkeys(r["op"] for r in rows))
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
    print(f"\n## decode, B=64 H=8 V=64, fp32 state ({gpu})")
    print("| M | op | CUDA-graph kernel us | eager wall us | GB/s |\n|---|---|---|---|---|")
    for d in decode:
        print(f"| {d['M']} | {d['op']} | {d['graph_us']:.1f} | {d['eager_wall_us']:.1f} | {d['GBps']:.0f} |")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

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
    except ImportError:
        print("matplotlib missing: no PNG written")


if __name__ == "__main__":
    main()
