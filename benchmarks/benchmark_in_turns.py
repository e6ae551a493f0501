"""Models timed in turns in one process: the ratio of their speeds, with the GPU's drift shared.

    python benchmarks/benchmark_in_turns.py --models gla fm_sparse_1024_16 --phase train
    python benchmarks/benchmark_in_turns.py --models gla fm_sparse_1024_16 --phase decode

The other speed scripts run each model in a process of its own, one after the other, and an
H200's speed drifted between them by more than the gaps being measured (the second of two 340M
models came out 5 to 15% slower, whichever it was; ``benchmarks/ops/NOTES.md``, session 11).
Here all the models are built (``contenders.build_model``) and kept in one process; each runs
``--warmup`` untimed steps, then ``--rounds`` rounds of ``--steps`` timed steps per model, the
models' order reversed every other round. A step is, with ``--phase train``, a forward +
backward + AdamW step (``contenders.training_step``) of ``--batch-tokens`` random tokens in
sequences of ``--seq-len``; with ``--phase decode``, one greedy decode step at batch
``--decode-batch`` after a ``--prompt``-token prompt: one CUDA graph replay on CUDA
(``graph_decoding.GraphDecoder``, so models with a growing attention cache cannot take part),
an eager step on the CPU. Each step is timed on its own up to a sync, as in
``benchmark_generation.py`` (transformers' ``generate`` syncs at every token).

Reports each model's median step over all rounds, its rounds' medians, and its throughput over
the first model's that ran (that model's median step over this one's). Writes ``in_turns.csv`` and
``in_turns.png`` under ``--out``.
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
    run_guarded,
    start_run,
    synchronize,
    training_step,
)
from graph_decoding import GraphDecoder
from quality.common import print_table, pyplot, save_figure, write_csv
from tqdm import tqdm


def training_stepper(model: torch.nn.Module, args: argparse.Namespace, device: torch.device):
    """``step()``: one training step of ``model`` on a fixed batch of random tokens."""
    step = training_step(model.train(), device)
    ids = torch.randint(1, args.vocab_size, (max(1, args.batch_tokens // args.seq_len), args.seq_len), device=device)
    return lambda: step(ids)


@torch.no_grad()
def decode_stepper(model: torch.nn.Module, args: argparse.Namespace, device: torch.device):
    """``step()``: one greedy decode step of ``model`` after a random prompt, a CUDA graph replay
    on CUDA."""
    model.eval()
    prompt = torch.randint(1, args.vocab_size, (args.decode_batch, args.prompt), device=device)
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    if device.type == "cuda":
        return GraphDecoder(model, cache, token).step

    def eager_step():
        nonlocal cache, token
        with torch.no_grad():
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    return eager_step


def timed_steps(step, steps: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``steps`` calls of ``step``, each up to a sync."""
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def run(args: argparse.Namespace, dtype: torch.dtype) -> list[dict]:
    """One row per model: its median step and rounds, or why it did not run."""
    device = torch.device(args.device)
    make_stepper = training_stepper if args.phase == "train" else decode_stepper
    max_len = args.seq_len if args.phase == "train" else args.prompt + args.warmup + args.rounds * args.steps + 1
    rows, steppers = [], {}
    for name in tqdm(args.models, desc="build and warm up"):
        contender = CONTENDERS[name]
        if reason := contender.unavailable_on(device):
            rows.append(dict(model=name, phase=args.phase, status=reason))
            continue

        def build_and_warm_up(contender=contender):
            model = build_model(
                contender, args.params, args.hidden_size, args.num_layers, args.num_heads, args.vocab_size, max_len,
                device, dtype,
            )  # fmt: skip
            stepper = make_stepper(model, args, device)
            timed_steps(stepper, args.warmup, device)
            return {"stepper": stepper}

        built = run_guarded(build_and_warm_up, device)
        if built["status"] == "ok":
            steppers[name] = built["stepper"]
        else:  # out of memory, or a model that cannot take part (an attention cache in a graph)
            rows.append(dict(model=name, phase=args.phase, status=built["status"]))
    times = {name: [] for name in steppers}
    for round_index in tqdm(range(args.rounds), desc="rounds"):
        order = list(steppers) if round_index % 2 == 0 else list(steppers)[::-1]
        for name in order:
            times[name].append(timed_steps(steppers[name], args.steps, device))
    medians = {name: statistics.median(t for r in rounds for t in r) for name, rounds in times.items()}
    first = next(iter(medians.values()), None)
    for name, rounds in times.items():
        rows.append(
            dict(
                model=name,
                phase=args.phase,
                ms_per_step=round(medians[name], 3),
                round_medians=" ".join(f"{statistics.median(r):.3f}" for r in rounds),
                throughput_over_first=round(first / medians[name], 3),
                status="ok",
            )
        )
    return sorted(rows, key=lambda r: args.models.index(r["model"]))


def plot(rows: list[dict], path: str, title: str) -> None:
    plt = pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    if plt is None or not ok:
        return
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(ok), 4))
    for i, row in enumerate(ok):
        rounds = [float(t) for t in row["round_medians"].split()]
        ax.bar(i, row["ms_per_step"], 0.6)
        ax.plot([i] * len(rounds), rounds, "k.", markersize=4)
    ax.set_xticks(range(len(ok)), labels=[r["model"] for r in ok], fontsize=7)
    ax.set_ylabel("ms per step (median; dots: rounds)")
    ax.set_title(title, fontsize=8)
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--phase", choices=["train", "decode"], default="train")
    parser.add_argument("--seq-len", type=int, default=8192, help="training sequence length")
    parser.add_argument("--batch-tokens", type=int, default=32768, help="tokens per training step")
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64, help="prompt length before decoding")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model (compilation, autotuning)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model and round")
    args = parser.parse_args()
    if args.models == list(CONTENDERS):
        parser.error("give --models: all the models at once may not fit in memory together")
    return args


def main():
    args = parse_args()
    machine, dtype = start_run(args)
    shape = f"T={args.seq_len}, {args.batch_tokens} tokens" if args.phase == "train" else f"batch {args.decode_batch}"
    print(f"{args.phase} steps in turns on {machine}; {dtype}, {shape}, ~{args.params / 1e6:g}M parameters")
    rows = run(args, dtype)
    csv_path = os.path.join(args.out, "in_turns.csv")
    write_csv(rows, csv_path)
    print_table(rows, ["model", "phase", "ms_per_step", "round_medians", "throughput_over_first", "status"])
    plot(rows, os.path.join(args.out, "in_turns.png"), f"{args.phase} steps in turns, {dtype}, {shape}\n{machine}")
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
