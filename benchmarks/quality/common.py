"""What the quality experiments share: the contenders, their configs, parameter and state
counts, the training loop, a pool of GPU workers, and the CSV, table and plot outputs."""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

import fla_factmem
from fla_factmem import FactorizationMemoryConfig, FactorizationMemoryForCausalLM
from fla_factmem.layers import routing_summary
from fla_factmem.models.mixers import mixer_entry

MIXER_OPTIONS = {
    # every recurrent mixer gets its short convolution (FLA's GLA defaults to none; FM and Mamba-2 have one)
    "gla": {"use_short_conv": True},
}


@dataclass(frozen=True)
class Contender:
    """One model of a comparison: every layer is ``mixer``; M and K for Factorization Memory;
    ``num_heads`` overrides the experiment's heads (a wide M needs fewer heads to keep the
    routing projection, hidden x heads*M, within an equal parameter count)."""

    name: str
    mixer: str
    num_memories: int | None = None
    topk: int | None = None
    num_heads: int | None = None

    @property
    def needs_cuda(self) -> bool:
        return mixer_entry(self.mixer).needs_cuda

    def unavailable_on(self, device: torch.device | str) -> str | None:
        """Why this contender cannot run on ``device``, or None when it can."""
        if self.needs_cuda and torch.device(device).type != "cuda":
            return "needs CUDA (FLA's Triton kernels)"
        return None


def stack_config(
    contender: Contender,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    vocab_size: int,
    max_len: int,
    **settings,
) -> FactorizationMemoryConfig:
    """A stack of ``num_layers`` blocks of the contender's mixer and a SwiGLU MLP, with no
    special tokens but padding id 0; ``settings`` are further config fields."""
    return FactorizationMemoryConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_heads=contender.num_heads or num_heads,
        num_memories=contender.num_memories or 64,
        topk=contender.topk,
        layer_types=[contender.mixer] * num_layers,
        max_position_embeddings=max_len,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        **settings,
    )


def model_config(
    contender: Contender,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    vocab_size: int,
    max_len: int,
    intermediate_size: int | None = None,
) -> FactorizationMemoryConfig:
    """The quality experiments' stack (``stack_config``), with the routing diagnostics of the
    Factorization Memory layers switched on. The MLP is PyTorch's (``fuse_swiglu=False``):
    FLA's fused one autotunes for every new shape, about 48 s each."""
    return stack_config(
        contender,
        hidden_size,
        num_layers,
        num_heads,
        vocab_size,
        max_len,
        mixer_options=MIXER_OPTIONS,
        intermediate_size=intermediate_size,
        track_routing=True,
        tie_word_embeddings=False,
        fuse_swiglu=False,
    )


def parameter_count(config: FactorizationMemoryConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in FactorizationMemoryForCausalLM(config).parameters())


def match_parameters(config: FactorizationMemoryConfig, target: int, multiple: int = 32) -> FactorizationMemoryConfig:
    """The config with the MLP's intermediate size chosen so that the model has about ``target``
    parameters (the mixers differ in size; the MLPs make up the difference)."""
    sizes = {}
    for width in (multiple, 2 * multiple):
        config.intermediate_size = width
        sizes[width] = parameter_count(config)
    per_unit = (sizes[2 * multiple] - sizes[multiple]) / multiple
    width = multiple * max(1, round((multiple + (target - sizes[multiple]) / per_unit) / multiple))
    config.intermediate_size = width
    return config


def recurrent_state_floats(model: torch.nn.Module, seq_len: int) -> int:
    """Floats of recurrent state per sequence, summed over layers; attention's KV cache at ``seq_len``."""
    total = 0
    for layer in model.modules():
        kind = type(layer).__name__
        if kind == "FactorizationMemory":
            total += layer.num_heads * layer.num_memories * layer.head_dim
        elif kind == "GatedLinearAttention":
            total += layer.num_heads * layer.head_k_dim * layer.head_v_dim
        elif kind == "Mamba2":
            total += layer.num_heads * layer.head_dim * layer.ssm_state_size
        elif kind == "Attention":
            total += 2 * seq_len * layer.num_kv_heads * layer.head_dim
    return total


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0))),
    )


def train(
    model: torch.nn.Module,
    next_loss: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    weight_decay: float = 0.1,
    progress: bool = False,
    every: int = 0,
    on_every: Callable[[int], None] | None = None,
) -> float:
    """AdamW (fused on CUDA) with warmup and cosine decay, gradient clipping at 1; ``next_loss(step)`` runs the
    forward of one batch. Returns the last step's loss. Checks the loss every 50 steps and at
    the end (one host sync each) and raises ``FloatingPointError`` at the first non-finite one.
    ``on_every(steps done)`` runs after every ``every`` steps but the last (for a learning
    curve; it must leave the model in training mode)."""
    on_cuda = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=on_cuda or None
    )
    schedule = cosine_schedule(optimizer, steps, warmup=max(1, steps // 20))
    model.train()
    for step in tqdm(range(steps), desc="steps", leave=False, disable=not progress):
        loss = next_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(f"loss {value} at step {step}")
        if every and (step + 1) % every == 0 and step + 1 < steps:
            on_every(step + 1)
    return value


def routing_columns(model: torch.nn.Module) -> dict[str, float | str]:
    """The routing diagnostics of the model's last forward, or blanks for other mixers."""
    summary = routing_summary(model)
    return {name: round(summary[name], 4) if name in summary else "" for name in ("entropy", "states_used", "max_load")}


def describe_machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'x86'})"
    versions = f"torch {torch.__version__}, fla_factmem {fla_factmem.__version__}"
    try:
        import fla
        import triton

        versions += f", fla {fla.__version__}, triton {triton.__version__}"
    except ImportError:
        pass
    return f"{name}; {versions}"


def run_all(
    tasks: list[dict], run_one: Callable[[dict], dict], jobs: int, desc: str, on_result: Callable[[list], None]
) -> list[dict]:
    """``run_one`` over ``tasks``, in order when ``jobs`` is 1, else in ``jobs`` spawned worker
    processes that share the GPU (small models leave most of it idle, and each worker keeps
    its Triton autotuning results across its tasks). One progress bar over the tasks;
    ``on_result(rows so far, in task order)`` after each, so a cut-off run leaves its results."""
    rows: list[dict | None] = [None] * len(tasks)
    with tqdm(total=len(tasks), desc=desc) as bar:
        if jobs <= 1:
            results = ((index, run_one(task)) for index, task in enumerate(tasks))
        else:
            # one CPU thread share each: workers with every core each thrash the host (seen: 20x slower steps)
            threads = max(1, (os.cpu_count() or 1) // jobs)
            pool = multiprocessing.get_context("spawn").Pool(
                jobs, initializer=torch.set_num_threads, initargs=(threads,)
            )
            results = pool.imap_unordered(_indexed, [(run_one, index, task) for index, task in enumerate(tasks)])
        for index, row in results:
            rows[index] = row
            on_result([r for r in rows if r is not None])
            bar.update()
        if jobs > 1:
            pool.close()
    return rows


def _indexed(job: tuple[Callable[[dict], dict], int, dict]) -> tuple[int, dict]:
    run_one, index, task = job
    return index, run_one(task)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (said once per call) when it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG written")
        return None
    return plt


def save_figure(fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
