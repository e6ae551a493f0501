"""Byte-level language models at equal parameters and steps, and their loss past the training length.

    python benchmarks/quality/lm.py [--params 20e6] [--steps 1500] [--eval-len 16384] [--jobs 6]

Data that needs no download: the Python standard library's sources, split by file into training
and held-out bytes (``fla_factmem.data``). Every model is a stack of the same blocks (mixer, then a
SwiGLU MLP) at the same width and depth; the MLP's width is set per model so that all have about
``--params`` parameters. Each trains on random windows of ``--seq-len`` bytes, then reports its
held-out loss at that length and its loss-so-far curve on held-out windows of ``--eval-len``
bytes: the mean loss of the first t bytes, for t out to 16x the training length (the paper's
Figure 4 in miniature). Writes ``lm.csv`` (one row per model), ``lm_curve.csv`` and ``lm.png``
under ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from common import (
    Contender,
    describe_machine,
    match_parameters,
    model_config,
    print_table,
    pyplot,
    recurrent_state_floats,
    routing_columns,
    run_all,
    save_figure,
    train,
    write_csv,
)

from fla_factmem import FactorizationMemoryForCausalLM
from fla_factmem.data import random_windows, stdlib_bytes

CONTENDERS = {
    c.name: c
    for c in (
        Contender("transformer", "attention"),
        Contender("gla", "gla"),
        Contender("mamba2", "mamba2"),
        Contender("fm_dense_256", "factorization_memory", num_memories=256),
        Contender("fm_sparse_256_64", "factorization_memory", num_memories=256, topk=64),
        Contender("fm_sparse_256_4", "factorization_memory", num_memories=256, topk=4),
    )
}


def loss_so_far(model, windows: list[torch.Tensor], device, autocast) -> torch.Tensor:
    """``[L]``: entry t-1 is the mean next-byte loss over the first t positions, averaged over
    the held-out ``windows`` (each ``[L + 1]`` bytes), one forward per window."""
    total = None
    with torch.no_grad():
        for window in windows:
            window = window.to(device)[None]
            with autocast:
                logits = model(input_ids=window[:, :-1]).logits
            losses = F.cross_entropy(logits.float()[0], window[0, 1:], reduction="none")
            total = losses if total is None else total + losses
    per_position = total / len(windows)
    return per_position.cumsum(0) / torch.arange(1, len(per_position) + 1, device=per_position.device)


def run_one(task: dict) -> dict:
    """Trains one contender; returns its table row and its loss-so-far curve (key ``curve``)."""
    contender: Contender = task["contender"]
    device = torch.device(task["device"])
    row = dict(model=contender.name, steps=task["steps"], seq_len=task["seq_len"])
    if reason := contender.unavailable_on(device):
        return row | {"status": reason, "curve": None}
    torch.manual_seed(task["seed"])
    config = match_parameters(
        model_config(
            contender,
            hidden_size=task["hidden_size"],
            num_layers=task["num_layers"],
            num_heads=task["num_heads"],
            vocab_size=256,
            max_len=task["seq_len"],
        ),
        task["params"],
    )
    model = FactorizationMemoryForCausalLM(config).to(device)
    row |= dict(
        params=sum(p.numel() for p in model.parameters()),
        mlp_width=config.intermediate_size,
        state=recurrent_state_floats(model, task["seq_len"]),
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    train_data, held_out = stdlib_bytes()
    generator = torch.Generator().manual_seed(task["seed"])

    def next_loss(step):
        batch = random_windows(train_data, task["batch_size"], task["seq_len"], generator).to(device)
        with autocast:
            logits = model(input_ids=batch[:, :-1]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    start = time.perf_counter()
    try:
        loss = train(model, next_loss, task["steps"], task["lr"], progress=task["progress"])
    except FloatingPointError as error:
        return row | {"status": f"diverged: {error}", "curve": None}
    train_s = time.perf_counter() - start
    routing = routing_columns(model)
    model.eval()
    eval_generator = torch.Generator().manual_seed(1234)
    short = list(random_windows(held_out, task["eval_windows"], task["seq_len"], eval_generator))
    long = list(random_windows(held_out, task["eval_windows"], task["eval_len"], eval_generator))
    held_out_loss = loss_so_far(model, short, device, autocast)[-1].item()
    curve = loss_so_far(model, long, device, autocast).cpu()
    row |= dict(train_loss=round(loss, 4), held_out_loss=round(held_out_loss, 4))
    for t in task["checkpoints"]:
        row[f"so_far_{t}"] = round(curve[t - 1].item(), 4)
    return row | routing | dict(train_s=round(train_s, 1), status="ok", curve=curve)


def curve_rows(rows: list[dict], points: int = 96) -> list[dict]:
    """Each model's loss-so-far at ``points`` log-spaced positions."""
    out = []
    for row in rows:
        curve = row["curve"]
        if curve is None:
            continue
        positions = torch.logspace(0, torch.log10(torch.tensor(float(len(curve)))), points).round().long().unique()
        out += [dict(model=row["model"], position=int(t), loss_so_far=round(curve[t - 1].item(), 5)) for t in positions]
    return out


def plot(curves: list[dict], seq_len: int, path: str, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(c["model"] for c in curves):
        points = [(c["position"], c["loss_so_far"]) for c in curves if c["model"] == name and c["position"] >= 64]
        ax.plot(*zip(*points), label=name)
    ax.axvline(seq_len, color="gray", linestyle=":", label="training length")
    ax.set(xscale="log", xlabel="position t (bytes)", ylabel="mean held-out loss of bytes 1..t (nats)")
    low = min(c["loss_so_far"] for c in curves if c["position"] >= 64)
    ax.set_ylim(low - 0.05, low + 1.0)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--params", type=float, default=20e6, help="parameters of every model (MLP width adapts)")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-len", type=int, default=16384, help="length of the loss-so-far windows")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes sharing the GPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/quality")
    return parser.parse_args()


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    machine = describe_machine(torch.device(args.device))
    checkpoints = [t for t in (256, 512, 1024, 2048, 4096, 8192, 16384) if t <= args.eval_len]
    print(
        f"byte-level LM on {machine}: {args.steps} steps of {args.batch_size} x {args.seq_len} bytes, "
        f"about {args.params / 1e6:g}M parameters each, seed {args.seed}"
    )
    tasks = [
        dict(
            contender=CONTENDERS[name],
            params=int(args.params),
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            eval_len=args.eval_len,
            eval_windows=args.eval_windows,
            checkpoints=checkpoints,
            seed=args.seed,
            device=args.device,
            progress=args.jobs <= 1,
        )
        for name in args.models
    ]
    csv_path = os.path.join(args.out, "lm.csv")

    def save_so_far(done):
        write_csv([{k: v for k, v in row.items() if k != "curve"} for row in done], csv_path)
        write_csv(curve_rows(done), os.path.join(args.out, "lm_curve.csv"))

    rows = run_all(tasks, run_one, args.jobs, desc="LM runs", on_result=save_so_far)
    curves = curve_rows(rows)
    reference = next((r["held_out_loss"] for r in rows if r["model"] == "transformer" and r["status"] == "ok"), None)
    for row in rows:
        if reference is not None and row["status"] == "ok":
            row["vs_transformer"] = round(row["held_out_loss"] / reference, 4)
        del row["curve"]
    write_csv(rows, csv_path)
    columns = ["model", "params", "state", "train_loss", "held_out_loss", "vs_transformer"]
    columns += [f"so_far_{t}" for t in checkpoints] + ["entropy", "states_used", "max_load", "train_s", "status"]
    print_table(rows, columns)
    if curves:
        title = f"loss so far, trained at {args.seq_len} bytes, {args.steps} steps; {machine}"
        plot(curves, args.seq_len, os.path.join(args.out, "lm.png"), title)
    print(f"wrote {args.out}/lm.csv and lm_curve.csv")


if __name__ == "__main__":
    main()
