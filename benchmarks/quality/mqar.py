"""Multi-query associative recall (MQAR), in the style of the Zoology benchmark (arXiv 2312.04927).

    python benchmarks/quality/mqar.py [--seq-lens 256 512] [--widths 64 128 256] [--jobs 8]

Each sequence lists ``P`` key-value pairs, then asks for the keys again, in random order, at
power-law distributed gaps, among filler tokens. Keys come from the lower half of the
vocabulary and values from the upper half; the model is trained on the next token after every
query key (the value) and scored by its accuracy there, on a held-out set. Every model has 2
blocks (mixer, then a SwiGLU MLP) of the same width, and the recurrent state of each is
reported, so that comparisons at equal state are visible. Training samples fresh sequences at
every step; like Zoology, which trains on a mixture of lengths, each step draws its length from
T, T/2, T/4, ... not below 64 (``--mixed-lengths``, on by default) with the same number of tokens
per step and ``length * pairs-per-token`` pairs, and the test is at T. Trained at T alone, no
model learned the task within a few thousand steps here; with mixed lengths attention does. The
vocabulary is 256 by default: at Zoology's 8192 no run learned within 2000 steps here. Writes
``mqar.csv``, ``mqar.png`` and ``mqar_curve.csv`` (the held-out accuracy every ``--eval-every``
steps) under ``--out`` and prints a table. With ``--jobs`` above 1 every evaluation also prints a
line, so that a run cut off by a time limit leaves its curve in the log.
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

CONTENDERS = {
    c.name: c
    for c in (
        Contender("attention", "attention"),
        Contender("gla", "gla"),
        Contender("mamba2", "mamba2"),
        Contender("fm_dense_64", "factorization_memory", num_memories=64),
        Contender("fm_sparse_256_64", "factorization_memory", num_memories=256, topk=64),
    )
}
IGNORE = -100
POWER_A = 0.01  # Zoology's exponent of the power law of query gaps


def mqar_batch(
    batch_size: int, seq_len: int, num_pairs: int, vocab_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)``, both ``[batch_size, seq_len]`` int64; targets are ``IGNORE``
    except at the query keys, where they are the value paired with that key."""
    half, context = vocab_size // 2, 2 * num_pairs
    space = (seq_len - context) // 2
    if num_pairs > min(half - 1, space):
        raise ValueError(f"{num_pairs} pairs do not fit in {seq_len} tokens with a vocabulary of {vocab_size}")
    keys = torch.rand(batch_size, half - 1, generator=generator).argsort(-1)[:, :num_pairs] + 1
    values = torch.randint(half, vocab_size, (batch_size, num_pairs), generator=generator)
    gaps = POWER_A * torch.arange(1, space + 1, dtype=torch.float64) ** (POWER_A - 1)
    slots = torch.multinomial(gaps.expand(batch_size, space), num_pairs, replacement=False, generator=generator)
    positions = context + 2 * slots  # where each key is asked again
    tokens = torch.zeros(batch_size, seq_len, dtype=torch.long)
    tokens[:, :context] = torch.stack([keys, values], -1).flatten(1)
    tokens.scatter_(1, positions, keys)
    targets = torch.full_like(tokens, IGNORE).scatter_(1, positions, values)
    return tokens, targets


def length_ladder(seq_len: int, shortest: int = 64) -> list[int]:
    """The training lengths of ``--mixed-lengths``: ``seq_len``, halved while not below ``shortest``."""
    lengths = [seq_len]
    while lengths[0] // 2 >= shortest:
        lengths.insert(0, lengths[0] // 2)
    return lengths


def run_one(task: dict) -> dict:
    """Trains one contender at one width and sequence length; returns its table row."""
    contender: Contender = task["contender"]
    device = torch.device(task["device"])
    row = dict(
        model=contender.name,
        width=task["width"],
        seq_len=task["seq_len"],
        num_pairs=task["num_pairs"],
        lr=task["lr"],
        mixed_lengths=task["mixed_lengths"],
    )
    if reason := contender.unavailable_on(device):
        return row | {"status": reason}
    torch.manual_seed(task["seed"])
    config = model_config(
        contender,
        hidden_size=task["width"],
        num_layers=2,
        num_heads=max(1, task["width"] // task["head_dim"]),
        vocab_size=task["vocab_size"],
        max_len=task["seq_len"],
    )
    model = FactorizationMemoryForCausalLM(config).to(device)
    row |= dict(params=sum(p.numel() for p in model.parameters()), state=recurrent_state_floats(model, task["seq_len"]))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    shape = (task["seq_len"], task["num_pairs"], task["vocab_size"])
    train_generator = torch.Generator().manual_seed(task["seed"])
    lengths = length_ladder(task["seq_len"]) if task["mixed_lengths"] else [task["seq_len"]]
    # (batch, length, pairs) of each training length: the same tokens and pairs per token as at T
    train_shapes = [
        (
            task["batch_size"] * task["seq_len"] // length,
            length,
            max(1, round(length * task["num_pairs"] / task["seq_len"])),
        )
        for length in lengths
    ]

    def to_device(tensor):
        # pinned and non-blocking: a step queues its kernels without waiting for the last one's
        return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor

    def query_logits(inputs, targets):
        """``([queries, vocab] logits, [queries] targets)``: the head runs only where a value is asked.
        The query positions are found on the host, where the batch is drawn: a boolean index on
        the GPU would wait for the forward to finish."""
        asked = (targets != IGNORE).flatten().nonzero().squeeze(1)
        with autocast:
            hidden = model.model(input_ids=to_device(inputs)).last_hidden_state.flatten(0, 1)
            return model.lm_head(hidden.index_select(0, to_device(asked))).float(), to_device(targets.flatten()[asked])

    def next_loss(step):
        batch_size, length, pairs = train_shapes[torch.randint(len(train_shapes), (), generator=train_generator)]
        return F.cross_entropy(
            *query_logits(*mqar_batch(batch_size, length, pairs, task["vocab_size"], train_generator))
        )

    eval_s = 0.0  # evaluation time, kept out of train_s

    @torch.no_grad()
    def test_accuracy() -> float:
        """Accuracy on the held-out set (the same sequences at every call), at T."""
        nonlocal eval_s
        eval_start = time.perf_counter()
        model.eval()
        test_generator = torch.Generator().manual_seed(10_000 + task["seed"])
        correct = total = 0
        for _ in range(task["test_batches"]):
            logits, targets = query_logits(*mqar_batch(task["batch_size"], *shape, test_generator))
            correct += (logits.argmax(-1) == targets).sum().item()
            total += len(targets)
        model.train()
        eval_s += time.perf_counter() - eval_start
        return round(correct / total, 4)

    curve = []  # (steps done, accuracy): when a run learns, if it does

    def record(step: int) -> None:
        curve.append((step, test_accuracy()))
        if not task["progress"]:  # parallel workers: a line per evaluation, so a cut-off run leaves its curve
            print(
                f"{contender.name} width {task['width']} T {task['seq_len']} lr {task['lr']}: "
                f"step {step} accuracy {curve[-1][1]}",
                flush=True,
            )

    start = time.perf_counter()
    try:
        loss = train(
            model,
            next_loss,
            task["steps"],
            task["lr"],
            progress=task["progress"],
            every=task["eval_every"],
            on_every=record,
        )
    except FloatingPointError as error:
        return row | {"status": f"diverged: {error}", "curve": curve}
    train_s = time.perf_counter() - start - eval_s
    record(task["steps"])
    accuracy = curve[-1][1]
    return row | dict(
        accuracy=accuracy,
        train_loss=round(loss, 4),
        **routing_columns(model),
        train_s=round(train_s, 1),
        status="ok",
        curve=curve,
    )


def write_outputs(rows: list[dict], out: str) -> None:
    """``mqar.csv`` (a row per run) and ``mqar_curve.csv`` (a row per run and evaluation; none
    when no run trained, and then an older one is removed)."""
    write_csv([{k: v for k, v in row.items() if k != "curve"} for row in rows], os.path.join(out, "mqar.csv"))
    run_keys = ("model", "width", "seq_len", "lr")
    points = [
        {k: row[k] for k in run_keys} | {"step": step, "accuracy": accuracy}
        for row in rows
        for step, accuracy in row.get("curve", [])
    ]
    curve_path = os.path.join(out, "mqar_curve.csv")
    if points:
        write_csv(points, curve_path)
    elif os.path.exists(curve_path):
        os.remove(curve_path)


def plot(rows: list[dict], path: str, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    seq_lens = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(5 * len(seq_lens), 4), squeeze=False)
    for ax, seq_len in zip(axes[0], seq_lens):
        for name in dict.fromkeys(r["model"] for r in rows):
            best = {}  # over learning rates, as Zoology reports
            for r in rows:
                if r["model"] == name and r["seq_len"] == seq_len:
                    best[r["width"]] = max(best.get(r["width"], 0.0), r["accuracy"])
            if best:
                ax.plot(*zip(*sorted(best.items())), marker="o", label=name)
        ax.set(title=f"MQAR, T={seq_len}", xlabel="model width", ylabel="accuracy", xscale="log", ylim=(0, 1.02))
        ax.set_xticks(sorted({r["width"] for r in rows}), labels=[str(w) for w in sorted({r["width"] for r in rows})])
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    save_figure(fig, path)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--pairs-per-token", type=float, default=1 / 16, help="key-value pairs per sequence token")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=256,
        help="Zoology uses 8192; at a few thousand steps nothing learned it here (see the README)",
    )
    parser.add_argument("--head-dim", type=int, default=64, help="heads = width / head_dim for every mixer")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument(
        "--mixed-lengths",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each step draws its length from T, T/2, ... (not below 64), at the same tokens per step; "
        "--no-mixed-lengths: T only",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3], help="each is a run; the table keeps all")
    parser.add_argument("--test-batches", type=int, default=16)
    parser.add_argument(
        "--eval-every", type=int, default=250, help="steps between held-out evaluations (0: at the end only)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes sharing the GPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/quality")
    return parser.parse_args()


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    machine = describe_machine(torch.device(args.device))
    print(f"MQAR on {machine}; {args.steps} steps of {args.batch_size} sequences, seed {args.seed}")

    def pairs_at(seq_len: int) -> int:
        return max(1, round(seq_len * args.pairs_per_token))

    tasks = [
        dict(
            contender=CONTENDERS[name],
            width=width,
            seq_len=seq_len,
            num_pairs=pairs_at(seq_len),
            lr=lr,
            vocab_size=args.vocab_size,
            head_dim=args.head_dim,
            steps=args.steps,
            eval_every=args.eval_every,
            mixed_lengths=args.mixed_lengths,
            batch_size=args.batch_size,
            test_batches=args.test_batches,
            seed=args.seed,
            device=args.device,
            progress=args.jobs <= 1,
        )
        for seq_len in args.seq_lens
        for width in args.widths
        for name in args.models
        for lr in args.lrs
    ]
    for seq_len in args.seq_lens:  # fail now, not after hours of other runs (the shorter lengths fit if T does)
        mqar_batch(1, seq_len, pairs_at(seq_len), args.vocab_size, torch.Generator())
    rows = run_all(tasks, run_one, args.jobs, desc="MQAR runs", on_result=lambda done: write_outputs(done, args.out))
    columns = ["model", "seq_len", "num_pairs", "width", "lr", "params", "state", "accuracy", "train_loss"]
    print_table(rows, columns + ["entropy", "states_used", "max_load", "train_s", "status"])
    plot([r for r in rows if r["status"] == "ok"], os.path.join(args.out, "mqar.png"), f"MQAR on {machine}")
    print(f"wrote {args.out}/mqar.csv" + (" and mqar_curve.csv" if any(r.get("curve") for r in rows) else ""))


if __name__ == "__main__":
    main()
