"""Times the dense kernels' launch configurations at the benchmark shapes (bf16, B=4, T=4096,
H=8, V=64 for the chunked forward; B=64, H=8, V=64 decode), each checked against the default.

    python benchmarks/ops/sweep_launch_configs.py
"""

import itertools

import torch
import triton

from fla_factmem.ops.factorization_memory.launch import chunk_fwd, fused_recurrent_fwd


def inputs(B, T, H, M, V):
    dev, dt = "cuda", torch.bfloat16
    return (
        torch.randn(B, T, H, V, device=dev, dtype=dt),
        (2 * torch.randn(B, T, H, M, device=dev)).to(dt),
        torch.rand(B, T, H, device=dev, dtype=dt),
        torch.rand(B, T, H, device=dev, dtype=dt),
        torch.randn(B, H, M, V, device=dev),
    )


def sweep(name, fn, args, grid):
    ref = fn(*args)[0].float()
    results = []
    for cfg in grid:
        try:
            out = fn(*args, **cfg)[0].float()
            err = ((out - ref).norm() / ref.norm()).item()
            ms = triton.testing.do_bench(lambda: fn(*args, **cfg), warmup=10, rep=50, return_mode="median")
            results.append((ms, err, cfg))
        except Exception as e:
            print(f"{name} {cfg}: {type(e).__name__} {str(e).splitlines()[0][:80]}")
    for ms, err, cfg in sorted(results, key=lambda r: r[0])[:6]:
        print(f"{name} {ms * 1e3:9.1f} us  err {err:.1e}  {cfg}", flush=True)


def main():
    print(torch.cuda.get_device_name())
    for M in (64, 256):
        v, lg, e, m, h0 = inputs(4, 4096, 8, M, 64)
        grid = [
            dict(block_v=bv, num_warps=w, num_stages=s) for bv, w, s in itertools.product((16, 32, 64), (4, 8), (1, 2))
        ]
        sweep(f"chunk_fwd M={M}", lambda *a, **k: chunk_fwd(*a, False, None, **k), (v, lg, e, m, h0), grid)
        v, lg, e, m, h0 = inputs(64, 1, 8, M, 64)
        grid = [dict(block_v=bv, num_warps=w) for bv, w in itertools.product((4, 8, 16, 32), (1, 2, 4))]
        sweep(f"decode M={M}", lambda *a, **k: fused_recurrent_fwd(*a, True, None, **k), (v, lg, e, m, h0), grid)


if __name__ == "__main__":
    main()
