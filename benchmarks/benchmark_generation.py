"""Generation speed of whole models at equal parameters: prefill time and decode tokens/s with
the cache, at several context lengths and batch sizes.

    python benchmarks/benchmark_generation.py [--params 340e6] [--contexts 4096 16384 65536] [--batch-sizes 1 32]

The models are those of ``benchmark_training_throughput.py`` (same stack, same parameter count).
For each context length and batch size: one prefill of ``context`` random tokens that builds
the cache (only the last position's logits are computed), then ``--decode-tokens`` greedy
steps of one token each, each timed on its own (with a sync, as transformers' ``generate``
syncs at every token to check for stops); the median step is reported, and decode tokens/s
counts every sequence of the batch. Decoding is eager, so at these sizes it measures the host's
launch overhead as much as the kernels; ``--cuda-graph`` also times each step as one CUDA graph
replay (``graph_decoding.GraphDecoder``; models with attention, whose KV cache grows, are listed
as not capturable), which leaves the kernels and the memory traffic. Each model first runs a
short untimed prefill and decode at every batch size (compilation and autotuning). Mamba-2
without mamba_ssm prefills through our ``chunk_gla`` SSD and decodes with FLA's PyTorch step, so
its decode rows measure that fallback, not mamba_ssm's kernel. ``--max-tokens`` skips the
largest cells (batch 32 at 64K is 2M prompt tokens). A run that runs out of memory or fails
stays in the table with the reason. Writes ``generation.csv`` and ``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from contenders import (
    CONTENDERS,
    add_model_arguments,
    build_model,
    in_own_process,
    peak_gib,
    reset_peak,
    run_guarded,
    start_run,
    synchronize,
)
from graph_decoding import GraphDecoder
from quality.common import print_table, pyplot, save_figure, write_csv
from tqdm import tqdm


def median_step_s(step, new_tokens: int, device) -> float:
    """The median wall time of ``new_tokens`` calls of ``step``, each timed on its own up to a sync."""
    times = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def generate(
    model, batch_size: int, context: int, new_tokens: int, vocab_size: int, device, cuda_graph: bool = False
) -> dict:
    """A greedy generation from a random prompt: ``prefill_s`` and ``step_s``, the median seconds
    of one eager decode step, and ``peak_gib`` up to there; with ``cuda_graph`` also
    ``graph_step_s`` (one graph replay per step, then the same number of steps on) and
    ``graph_status``, which says why when there is no graph.
    The prefill runs twice and the second is timed: kernels whose autotuning depends on the
    length tune in the first. Each decode step is timed on its own (eager decoding is bound by
    the host, and with one total over all steps rows moved by up to 2x between context lengths
    on an H200, where the work of a step does not depend on the context)."""
    prompt = torch.randint(1, vocab_size, (batch_size, context), device=device)
    for _ in range(2):
        synchronize(device)
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        synchronize(device)
        prefill_s = time.perf_counter() - start
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def eager_step():
        nonlocal cache, token
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    result = dict(prefill_s=prefill_s, step_s=median_step_s(eager_step, new_tokens, device), peak_gib=peak_gib(device))
    if cuda_graph:
        try:
            decoder = GraphDecoder(model, cache, token)
        except Exception as error:  # noqa: BLE001 (not capturable: the row keeps its eager timings and says why)
            cause = error.__context__ or error  # a broken capture reports itself over the step's error
            return result | dict(graph_status=f"no graph: {type(cause).__name__}: {str(cause).splitlines()[0][:120]}")
        result |= dict(graph_step_s=median_step_s(decoder.step, new_tokens, device), graph_status="ok")
    return result


def run_model(name: str, args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    """The rows of one model: one per (context, batch size)."""
    contender, device = CONTENDERS[name], torch.device(args.device)
    cells = [(context, batch) for context in args.contexts for batch in args.batch_sizes]
    rows = [dict(model=name, context=context, batch_size=batch) for context, batch in cells]
    if reason := contender.unavailable_on(device):
        return [row | {"status": reason} for row in rows]

    def build():
        model = build_model(
            contender,
            args.params,
            args.hidden_size,
            args.num_layers,
            args.num_heads,
            args.vocab_size,
            max(args.contexts) + args.decode_tokens,
            device,
            dtype,
        ).eval()
        for batch in args.batch_sizes:  # compile and autotune outside the timings
            generate(model, batch, args.warmup_context, 4, args.vocab_size, device, args.cuda_graph)
        return {"model": model}

    built = run_guarded(build, device)
    if built["status"] != "ok":
        return [row | {"status": f"warm-up {built['status']}"} for row in rows]
    model = built.pop("model")

    def measure(context, batch):
        reset_peak(device)
        timed = generate(model, batch, context, args.decode_tokens, args.vocab_size, device, args.cuda_graph)
        row = dict(
            prefill_ms=round(1e3 * timed["prefill_s"], 1),
            decode_ms_per_token=round(1e3 * timed["step_s"], 3),
            decode_tokens_per_s=round(batch / timed["step_s"]),
        )
        if "graph_step_s" in timed:
            row |= dict(
                graph_ms_per_token=round(1e3 * timed["graph_step_s"], 3),
                graph_tokens_per_s=round(batch / timed["graph_step_s"]),
            )
        if "graph_status" in timed:
            row["graph_status"] = timed["graph_status"]
        return row | {"peak_gib": timed["peak_gib"]}

    return [
        row | {"status": f"skipped: {batch} x {context} tokens over --max-tokens"}
        if args.max_tokens and batch * context > args.max_tokens
        else row | run_guarded(lambda: measure(context, batch), device)
        for row, (context, batch) in zip(rows, cells)
    ]


def plot(rows: list[dict], path: str, title: str) -> None:
    plt = pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    if plt is None or not ok:
        return
    batches = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches) + 2.5, 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for name in dict.fromkeys(r["model"] for r in rows):
            points = sorted(
                (r["context"], r["decode_tokens_per_s"]) for r in ok if r["model"] == name and r["batch_size"] == batch
            )
            if points:
                (line,) = ax.plot(*zip(*points), marker="o", label=name)
            graphed = sorted(
                (r["context"], r["graph_tokens_per_s"])
                for r in ok
                if r["model"] == name and r["batch_size"] == batch and r.get("graph_tokens_per_s")
            )
            if graphed:
                ax.plot(*zip(*graphed), marker="s", linestyle="--", color=line.get_color(), label=f"{name}, CUDA graph")
        ax.set(title=f"batch {batch}", xlabel="context length", ylabel="decode tokens/s", xscale="log", yscale="log")
        contexts = sorted({r["context"] for r in rows})
        ax.set_xticks(contexts, labels=[f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts], minor=False)
        ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    # one legend beside the last panel: inside, a dozen entries hid the lines
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--contexts", nargs="+", type=int, default=[4096, 16384, 65536])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--warmup-context", type=int, default=256)
    parser.add_argument(
        "--cuda-graph", action="store_true", help="also time decoding as one CUDA graph replay per token (CUDA only)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="skip (and list as skipped) cells of more prompt tokens than this"
    )
    args = parser.parse_args()
    if args.cuda_graph and torch.device(args.device).type != "cuda":
        parser.error("--cuda-graph needs --device cuda")
    return args


def main():
    args = parse_args()
    machine, dtype = start_run(args)
    print(f"generation on {machine}; {dtype}, ~{args.params / 1e6:g}M parameters, {args.decode_tokens} new tokens")
    csv_path = os.path.join(args.out, "generation.csv")
    rows = []
    for name in tqdm(args.models, desc="models"):
        rows += in_own_process(run_model, name, args, dtype, device=torch.device(args.device))
        write_csv(rows, csv_path)
    columns = ["model", "context", "batch_size", "prefill_ms", "decode_ms_per_token", "decode_tokens_per_s"]
    if args.cuda_graph:
        columns += ["graph_ms_per_token", "graph_tokens_per_s", "graph_status"]
    print_table(rows, columns + ["peak_gib", "status"])
    plot(rows, os.path.join(args.out, "generation.png"), f"decoding with the cache, {dtype}; {machine}")
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
