"""Times the dense kernels' launch configurations at the benchmark shapes (bf16, B=4, T=4096,
H=8, V=64 for the chunked forward and backward; B=64, H=8, V=64 decode), each checked
against the default, and splits the default forward and backward into their stages.

    python benchmarks/ops/sweep_launch_configs.py
"""

import argparse
import functools
import itertools
import sys

import torch
import triton

from fla_factmem.ops.factorization_memory.launch import (
    chunk_bwd,
    chunk_fwd,
    chunk_layout,
    chunk_states,
    fused_recurrent_fwd,
    logsumexp,
)


def inputs(B, T, H, M, V):
    dev, dt = "cuda", torch.bfloat16
    return (
        torch.randn(B, T, H, V, device=dev, dtype=dt),
        (2 * torch.randn(B, T, H, M, device=dev)).to(dt),
        torch.rand(B, T, H, device=dev, dtype=dt),
        torch.rand(B, T, H, device=dev, dtype=dt),
        torch.randn(B, H, M, V, device=dev),
    )


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def sweep(name, fn, grid, ref_fn=None):
    """Times fn at each launch of grid, each checked against ref_fn's (by default fn's own default)."""
    ref = [x.float() for x in (ref_fn or fn)() if x is not None]
    results = []
    for cfg in grid:
        try:
            out = [x.float() for x in fn(**cfg) if x is not None]
            err = max(((a - b).norm() / b.norm()).item() for a, b in zip(out, ref))
            results.append((bench(lambda: fn(**cfg)), err, cfg))
        except Exception as e:
            print(f"{name} {cfg}: {type(e).__name__} {str(e).splitlines()[0][:80]}")
    for ms, err, cfg in sorted(results, key=lambda r: r[0])[:5]:
        print(f"{name} {ms * 1e3:9.1f} us  err {err:.1e}  {cfg}", flush=True)


def stages(B, T, H, M, V, v, lg, e, m, h0):
    """Medians of each launch of the default forward and backward."""
    lse, _ = logsumexp(lg, e)
    layout = chunk_layout(B, T, None)
    do = torch.randn_like(v)
    *_, saved = chunk_fwd(v, lg, e, m, h0, True, None)
    parts = {
        "logsumexp": lambda: logsumexp(lg, e),
        "fwd total": lambda: chunk_fwd(v, lg, e, m, h0, True, None),
        "bwd total": lambda: chunk_bwd(v, lg, e, m, saved, do, None, None, True),
    }
    for walk, way in ((False, "increments+scan"), (True, "walk")):
        for direction, x, start, reverse in (("fwd", v, h0, False), ("bwd", do, None, True)):
            parts[f"{direction} states ({way})"] = functools.partial(
                chunk_states, x, lg, lse, e, m, start, True, layout, None, B, reverse, walk
            )
    for name, fn in parts.items():
        print(f"M={M} {name:30s} {bench(fn) * 1e3:9.1f} us", flush=True)


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_launch_configs.py times the Triton kernels and needs a CUDA GPU")
    print(torch.cuda.get_device_name())
    for M in (64, 256):
        B, T, H, V = 4, 4096, 8, 64
        v, lg, e, m, h0 = inputs(B, T, H, M, V)
        stages(B, T, H, M, V, v, lg, e, m, h0)
        grid = [dict(block_m=bm, num_warps=w) for bm, w in itertools.product((16, 32, 64), (1, 2, 4, 8))]
        sweep(f"chunk_fwd M={M}", lambda **k: chunk_fwd(v, lg, e, m, h0, True, None, **k)[:2], grid)
        _, _, saved = chunk_fwd(v, lg, e, m, h0, True, None)
        do = torch.randn_like(v)
        # the dq/dk kernel's two forms (launch.dqk_walks), both checked against the levels' default
        levels = lambda: chunk_bwd(v, lg, e, m, saved, do, None, None, True, walk=False)  # noqa: E731
        for walk in (False, True):
            sweep(
                f"chunk_bwd M={M} {'walk' if walk else 'levels'}",
                lambda **k: chunk_bwd(v, lg, e, m, saved, do, None, None, True, walk=walk, **k),
                grid,
                levels,
            )
        v, lg, e, m, h0 = inputs(64, 1, 8, M, 64)
        grid = [dict(block_v=bv, num_warps=w) for bv, w in itertools.product((8, 16, 32, 64), (1, 2, 4, 8, 16))]
        sweep(f"decode M={M}", lambda **k: fused_recurrent_fwd(v, lg, e, m, h0, True, None, **k), grid)


if __name__ == "__main__":
    main()
