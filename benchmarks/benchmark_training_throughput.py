"""Training throughput of whole models at equal parameters: tokens/s and peak memory of a full
forward + backward + AdamW step, at several sequence lengths.

    python benchmarks/benchmark_training_throughput.py [--params 340e6] [--seq-lens 2048 8192 32768]

Every model is the same stack (embeddings, ``--num-layers`` blocks of mixer then SwiGLU MLP, a
head), with the MLP width set per model so that all have about ``--params`` parameters. Each
step sees ``--batch-tokens`` tokens (``batch = batch_tokens // seq_len``) of random ids. Weights,
AdamW's state and activations are bf16 on CUDA, as in FLA's own throughput benchmark (no fp32
master weights), and the loss is FLA's fused cross-entropy. ``--warmup`` steps
(compilation and autotuning included) are not timed; the median of the ``--steps`` timed steps
is reported. A model that runs out of memory or whose kernels fail on the installed Triton stays
in the table with the reason. Writes ``training_throughput.csv`` and ``.png`` under ``--out``.
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
    build_task_model,
    in_own_process,
    peak_gib,
    reset_peak,
    run_guarded,
    start_run,
    synchronize,
    training_step,
)
from quality.common import print_table, pyplot, save_figure, write_csv
from tqdm import tqdm


def measure_training(task: dict) -> dict:
    """Builds the model and times its training steps; the row's measured columns."""
    device = torch.device(task["device"])
    model = build_task_model(task, task["seq_len"])
    train_step = training_step(model, device)
    batch_size = max(1, task["batch_tokens"] // task["seq_len"])
    times = []
    for step in tqdm(range(task["warmup"] + task["steps"]), desc="steps", leave=False):
        if step == task["warmup"]:  # autotuning's scratch buffers stay out of the peak; AdamW's state is in
            reset_peak(device)
        ids = torch.randint(1, task["vocab_size"], (batch_size, task["seq_len"]), device=device)
        synchronize(device)
        start = time.perf_counter()
        train_step(ids)
        synchronize(device)
        if step >= task["warmup"]:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return dict(
        params=sum(p.numel() for p in model.parameters()),
        batch_size=batch_size,
        ms_per_step=round(1e3 * step_s, 2),
        tokens_per_s=round(batch_size * task["seq_len"] / step_s),
        peak_gib=peak_gib(device),
    )


def run_model(tasks: list[dict]) -> list[dict]:
    """The rows of one model's tasks (sequence lengths) in order, in one process, so that its
    Triton kernels compile once. Stops after a failure other than running out of memory (a
    CUDA error poisons the process's context); the caller runs the rest in a fresh process."""
    rows = []
    for task in tasks:
        contender = task["contender"]
        row = dict(model=contender.name, seq_len=task["seq_len"])
        if reason := contender.unavailable_on(task["device"]):
            rows.append(row | {"status": reason})
            continue
        rows.append(row | run_guarded(lambda: measure_training(task), torch.device(task["device"])))
        if rows[-1]["status"].startswith("failed"):
            break
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    plt = pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    if plt is None or not ok:
        return
    from matplotlib.patches import Patch  # matplotlib is optional: pyplot() returned it, so it is there

    models = list(dict.fromkeys(r["model"] for r in rows))
    seq_lens = sorted({r["seq_len"] for r in rows})
    fig, ax = plt.subplots(figsize=(3.2 + 1.3 * len(seq_lens) * len(models) / 4, 4))
    width = 0.8 / len(models)
    did_not_run = []  # legend entries without a bar, so that the plot says which models failed
    for i, name in enumerate(models):
        by_len = {r["seq_len"]: r["tokens_per_s"] / 1e3 for r in ok if r["model"] == name}
        if not by_len:
            did_not_run.append(Patch(fill=False, edgecolor="0.6", label=f"{name} (did not run)"))
            continue
        xs = [j + i * width for j, t in enumerate(seq_lens) if t in by_len]
        ax.bar(xs, [by_len[t] for t in seq_lens if t in by_len], width, label=name, color=f"C{i % 10}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(seq_lens))], labels=[str(t) for t in seq_lens])
    ax.set(xlabel="sequence length", ylabel="training throughput (K tokens/s)")
    handles = ax.get_legend_handles_labels()[0] + did_not_run
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=8)
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[2048, 8192, 32768])
    parser.add_argument("--batch-tokens", type=int, default=32768, help="tokens per training step")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation, autotuning)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported")
    return parser.parse_args()


def main():
    args = parse_args()
    machine, dtype = start_run(args)
    print(
        f"training throughput on {machine}; {dtype}, {args.batch_tokens} tokens per step, ~{args.params / 1e6:g}M parameters"
    )
    csv_path = os.path.join(args.out, "training_throughput.csv")
    rows = []
    for name in tqdm(args.models, desc="models"):
        tasks = [
            dict(vars(args), contender=CONTENDERS[name], seq_len=seq_len, dtype=dtype) for seq_len in args.seq_lens
        ]
        while tasks:
            done = in_own_process(run_model, tasks, device=torch.device(args.device))
            rows += done
            tasks = tasks[len(done) :]
            write_csv(rows, csv_path)
    print_table(rows, ["model", "seq_len", "params", "batch_size", "ms_per_step", "tokens_per_s", "peak_gib", "status"])
    plot(rows, os.path.join(args.out, "training_throughput.png"), f"training throughput, {dtype}; {machine}")
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
