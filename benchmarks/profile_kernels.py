"""Where a whole model's time goes: its kernels in one training step and in one decode step,
ranked by their own time.

    python benchmarks/profile_kernels.py --models fm_sparse_1024_16 gla [--seq-len 8192] [--decode-batch 32]

Each model is built as in the speed benchmarks (``contenders.build_model``: about ``--params``
parameters, bf16 on CUDA). ``--warmup`` training steps (compilation, autotuning) run first, then
one forward + backward + AdamW step of ``--batch-tokens`` random tokens runs under
``torch.profiler``. Then, after a prefill of ``--prompt`` tokens at batch ``--decode-batch``
and one untimed step, ``--decode-steps`` eager decode steps run under it. On CUDA an entry's
time is its kernels' own device time: eager decoding is bound by the host, and the sum of its
kernel times is a lower bound on one CUDA graph replay of the step (which adds the gaps between
kernels). On the CPU it is the operators' own CPU time. Each model runs in a process of its own.

Prints the ``--top`` entries of each model and phase, with the phase's total, and writes
``profile_kernels.csv`` (every entry: calls and milliseconds per step, milliseconds per call)
and ``profile_kernels.png`` (the top entries as bars) under ``--out``. A model that cannot run
stays in the CSV with the reason.
"""

from __future__ import annotations

import argparse
import os

import torch
from contenders import (
    CONTENDERS,
    add_model_arguments,
    build_task_model,
    in_own_process,
    run_guarded,
    start_run,
    synchronize,
    training_step,
)
from quality.common import print_table, pyplot, save_figure, write_csv
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm


def profiled(step, steps: int, device: torch.device) -> list[dict]:
    """``step()`` run ``steps`` times under the profiler: one entry per kernel (CUDA) or
    operator (CPU) name with its own time, most first."""
    on_cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    entries = []
    for event in prof.key_averages():
        own_us = event.self_device_time_total if on_cuda else event.self_cpu_time_total
        if own_us > 0:
            entries.append(
                dict(
                    name=event.key,
                    calls_per_step=round(event.count / steps, 2),
                    ms_per_step=round(own_us / 1e3 / steps, 4),
                    ms_per_call=round(own_us / 1e3 / event.count, 4),
                )
            )
    return sorted(entries, key=lambda e: -e["ms_per_step"])


def profile_training(model: torch.nn.Module, task: dict, device: torch.device) -> list[dict]:
    """The entries of one forward + backward + AdamW step, after ``task["warmup"]`` untimed ones."""
    step = training_step(model.train(), device)
    batch_size = max(1, task["batch_tokens"] // task["seq_len"])

    def train_step():
        step(torch.randint(1, task["vocab_size"], (batch_size, task["seq_len"]), device=device))

    for _ in range(task["warmup"]):
        train_step()
    return [{"phase": "train"} | e for e in profiled(train_step, 1, device)]


@torch.no_grad()
def profile_decoding(model: torch.nn.Module, task: dict, device: torch.device) -> list[dict]:
    """The entries of ``task["decode_steps"]`` eager decode steps after a prefill, per step."""
    model.eval()
    prompt = torch.randint(1, task["vocab_size"], (task["decode_batch"], task["prompt"]), device=device)
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def decode_step():
        nonlocal cache, token
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    decode_step()  # the decode kernels compile here, outside the profile
    return [{"phase": "decode"} | e for e in profiled(decode_step, task["decode_steps"], device)]


def run_model(task: dict) -> list[dict]:
    """The model's entries, phase by phase; a phase (or a build) that fails leaves one row that
    says why. After a failure other than running out of memory (a CUDA error poisons the
    process's context) the later phase does not run."""
    contender, device = task["contender"], torch.device(task["device"])
    head = dict(model=contender.name)
    if reason := contender.unavailable_on(device):
        return [head | {"status": reason}]
    max_len = max(task["seq_len"], task["prompt"] + task["decode_steps"] + 1)
    built = run_guarded(lambda: {"model": build_task_model(task, max_len)}, device)
    if built["status"] != "ok":
        return [head | {"status": f"build {built['status']}"}]
    model, rows = built["model"], []
    for phase, profile_phase in (("train", profile_training), ("decode", profile_decoding)):
        result = run_guarded(lambda: {"entries": profile_phase(model, task, device)}, device)
        if result["status"] != "ok":
            rows.append(head | {"phase": phase, "status": result["status"]})
            if result["status"].startswith("failed"):
                break
        else:
            rows += [head | entry | {"status": "ok"} for entry in result["entries"]]
    return rows


def report(rows: list[dict], top: int) -> None:
    """The top entries of each model and phase, and the phase's total per step."""
    for model in dict.fromkeys(r["model"] for r in rows):
        for phase in ("train", "decode"):
            entries = [r for r in rows if r["model"] == model and r.get("phase") == phase and r["status"] == "ok"]
            if entries:
                total = sum(e["ms_per_step"] for e in entries)
                print(f"\n{model}, {phase}: {total:.3f} ms per step in {len(entries)} entries")
                print_table(entries[:top], ["ms_per_step", "calls_per_step", "ms_per_call", "name"])
        for row in rows:
            if row["model"] == model and row["status"] != "ok":
                print(f"\n{model}{', ' + row['phase'] if row.get('phase') else ''}: {row['status']}")


def plot(rows: list[dict], path: str, top: int, title: str) -> None:
    plt = pyplot()
    panels = list(dict.fromkeys((r["model"], r["phase"]) for r in rows if r["status"] == "ok"))
    if plt is None or not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 0.25 * top * len(panels) + 1), squeeze=False)
    for ax, (model, phase) in zip(axes[:, 0], panels):
        entries = [r for r in rows if r["model"] == model and r.get("phase") == phase and r["status"] == "ok"]
        entries = entries[:top][::-1]
        # bars at numeric positions: kernels whose names agree in their first 60 characters (two
        # of PyTorch's elementwise kernels, say) would share one categorical position
        ax.barh(range(len(entries)), [e["ms_per_step"] for e in entries])
        ax.set_yticks(range(len(entries)), [e["name"][:60] for e in entries])
        ax.set_title(f"{model}, {phase}", fontsize=8)
        ax.set_xlabel("ms per step (own time)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--seq-len", type=int, default=8192, help="training sequence length")
    parser.add_argument("--batch-tokens", type=int, default=32768, help="tokens of the training step")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps before the profiled one")
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64, help="prefill length before decoding")
    parser.add_argument("--decode-steps", type=int, default=4, help="profiled decode steps (entries are per step)")
    parser.add_argument("--top", type=int, default=15, help="entries printed and plotted per model and phase")
    return parser.parse_args()


def main():
    args = parse_args()
    machine, dtype = start_run(args)
    print(f"kernel profile on {machine}; {dtype}, ~{args.params / 1e6:g}M parameters")
    csv_path = os.path.join(args.out, "profile_kernels.csv")
    rows = []
    for name in tqdm(args.models, desc="models"):
        task = dict(vars(args), contender=CONTENDERS[name], dtype=dtype)
        rows += in_own_process(run_model, task, device=torch.device(args.device))
        write_csv(rows, csv_path)  # a run cut off later keeps the models done
    report(rows, args.top)
    title = f"own time per step, {dtype}; training T={args.seq_len}, decode batch {args.decode_batch}; {machine}"
    plot(rows, os.path.join(args.out, "profile_kernels.png"), args.top, title)
    print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
