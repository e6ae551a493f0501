"""The models that the end-to-end speed benchmarks compare, built at equal parameter counts."""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import torch
from quality.common import Contender, describe_machine, match_parameters, stack_config

from fla_factmem import FactorizationMemoryForCausalLM

CONTENDERS = {
    c.name: c
    for c in (
        Contender("transformer", "attention"),
        Contender("gla", "gla"),
        Contender("delta_net", "delta_net"),
        Contender("gated_deltanet", "gated_deltanet"),
        Contender("mamba2", "mamba2"),
        Contender("fm_dense_64", "factorization_memory", num_memories=64),
        Contender("fm_dense_256", "factorization_memory", num_memories=256),
        # 4 heads of V = 256: at 16 heads the routing projection alone (1024 x 16*1024 per layer)
        # would exceed the parameter budget
        Contender("fm_sparse_1024_16", "factorization_memory", num_memories=1024, topk=16, num_heads=4),
    )
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both speed scripts share: which models, their size, the device, the output folder."""
    parser.add_argument("--models", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--params", type=float, default=340e6, help="parameters of every model (MLP width adapts)")
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--num-layers", type=int, default=24)
    parser.add_argument("--num-heads", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/speed")


def start_run(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    """What every speed script does first: makes ``args.out`` and returns the machine's
    description and the models' dtype (bf16 on CUDA, float32 on the CPU)."""
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    return describe_machine(device), torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(
    contender: Contender,
    params: float,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    vocab_size: int,
    max_len: int,
    device: torch.device,
    dtype: torch.dtype,
) -> FactorizationMemoryForCausalLM:
    """A stack of ``num_layers`` blocks (the contender's mixer, then a SwiGLU MLP) whose MLP
    width makes about ``params`` parameters, in ``dtype`` on ``device``, with FLA's fused kernels."""
    config = match_parameters(
        stack_config(contender, hidden_size, num_layers, num_heads, vocab_size, max_len), int(params)
    )
    torch.manual_seed(0)
    return FactorizationMemoryForCausalLM(config).to(device, dtype)


def build_task_model(task: dict, max_len: int) -> FactorizationMemoryForCausalLM:
    """``build_model`` from a speed script's task (its parsed options plus ``contender`` and
    ``dtype``)."""
    return build_model(
        task["contender"],
        task["params"],
        task["hidden_size"],
        task["num_layers"],
        task["num_heads"],
        task["vocab_size"],
        max_len,
        torch.device(task["device"]),
        task["dtype"],
    )


def training_step(model: torch.nn.Module, device: torch.device) -> Callable[[torch.Tensor], None]:
    """``step(ids)``: one forward + backward + AdamW step of ``model`` on ``ids`` [B, T] (the
    labels too), as the speed scripts time it: AdamW fused on CUDA with weight decay 0.1, the
    gradients freed after the step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=device.type == "cuda")

    def step(ids: torch.Tensor) -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_guarded(measure, device: torch.device) -> dict:
    """``measure()``'s result, or a ``status`` that says why it did not run: out of memory, or
    the exception (for instance an FLA kernel that refuses the installed Triton), so that the
    row stays in the table. Frees the GPU memory either way."""
    try:
        return measure() | {"status": "ok"}
    except torch.OutOfMemoryError:
        return {"status": "out of memory"}
    except Exception as error:  # noqa: BLE001 (any failure becomes a row that names it)
        last = traceback.extract_tb(error.__traceback__)[-1]
        return {"status": f"failed: {type(error).__name__}: {str(error)[:120]} ({last.filename.split('/')[-1]})"}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | str:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else ""


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def in_own_process(function, *args, device: torch.device):
    """``function(*args)``, in a spawned process of its own on CUDA: a CUDA error such as an
    illegal memory access poisons the process's context, and every later model would then fail
    with a misleading message. In this process on the CPU."""
    if device.type != "cuda":
        return function(*args)
    # an executor, not a Pool: a worker that dies raises BrokenProcessPool instead of hanging
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as executor:
        return executor.submit(function, *args).result()
