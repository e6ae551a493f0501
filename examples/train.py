"""Train a small hybrid Factorization Memory + attention language model, then sample from it.

    python examples/train.py [--steps 200] [--layers factorization_memory,attention,...] [--device cpu|cuda]

Byte-level data that needs no download: the Python standard library's own source files
(found through ``sysconfig``), split by file into training and held-out sets. The run trains
with a progress bar (loss, tokens/s), reports held-out loss, saves the model with
``save_pretrained``, reloads it through ``AutoModelForCausalLM`` (printing the largest
difference of the two models' logits) and prints a generated sample. The defaults finish in about two minutes on a
2-core CPU; on a GPU the Factorization Memory layers run the Triton kernels.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from fla_factmem import FactorizationMemoryConfig, registered_mixers
from fla_factmem.data import random_windows, stdlib_bytes
from fla_factmem.models.mixers import mixer_entry

DEFAULT_LAYERS = "factorization_memory,factorization_memory,attention,factorization_memory"
UNTIMED_STEPS = 5  # the first steps compile kernels (Triton, on the GPU); tokens/s counts the steps after them


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences a step")
    parser.add_argument("--seq-len", type=int, default=256, help="bytes a sequence")
    cuda_only = [name for name in registered_mixers() if mixer_entry(name).needs_cuda]
    parser.add_argument(
        "--layers",
        default=DEFAULT_LAYERS,
        help=f"comma-separated mixers, from {registered_mixers()} ({cuda_only}: CUDA only)",
    )
    parser.add_argument("--hidden-size", type=int, default=128, help="model width")
    parser.add_argument("--num-heads", type=int, default=4, help="heads of every mixer")
    parser.add_argument("--num-memories", type=int, default=32, help="M, memory states per head")
    parser.add_argument("--topk", type=int, default=None, help="K active states per token (sparse); dense if unset")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warm-up, then cosine)")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches for the held-out loss")
    parser.add_argument("--sample-len", type=int, default=240, help="bytes to generate at the end")
    parser.add_argument("--prompt", default="def ", help="text the sample continues")
    parser.add_argument("--out", default="runs/train", help="where save_pretrained writes the model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="of the weights and the batches")
    args = parser.parse_args()
    # refused before the data and the model are made, not after the training run
    for name in ("steps", "eval_batches", "sample_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if not args.prompt:
        parser.error("--prompt must not be empty")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but this PyTorch sees no CUDA GPU")
    args.layers = [name.strip() for name in args.layers.split(",") if name.strip()]
    on_cpu = [name for name in args.layers if name in cuda_only]
    if torch.device(args.device).type != "cuda" and on_cpu:
        parser.error(f"--layers {on_cpu} run on CUDA only (FLA's Triton kernels); this run is on {args.device}")
    return args


def build_config(args, layer_types: list[str]) -> FactorizationMemoryConfig:
    return FactorizationMemoryConfig(
        vocab_size=256,
        hidden_size=args.hidden_size,
        num_hidden_layers=len(layer_types),
        layer_types=layer_types,
        num_heads=args.num_heads,
        num_memories=args.num_memories,
        topk=args.topk,
        max_position_embeddings=args.seq_len,
        pad_token_id=0,  # byte 0 never occurs in the sources
        bos_token_id=None,
        eos_token_id=None,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def next_token_loss(model, batch: torch.Tensor, autocast: torch.autocast) -> torch.Tensor:
    with autocast:
        logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    train_data, held_out_data = stdlib_bytes()
    model = AutoModelForCausalLM.from_config(build_config(args, args.layers)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"data: {len(train_data) / 1e6:.1f} MB train, {len(held_out_data) / 1e6:.2f} MB held out (stdlib sources)\n"
        f"model: {n_params / 1e6:.2f}M parameters, layers {args.layers}, device {device}"
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / args.steps, 1.0))),
    )
    generator = torch.Generator().manual_seed(args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    model.train()
    smoothed, untimed = None, min(UNTIMED_STEPS, args.steps - 1)
    with tqdm(range(args.steps), desc="train", unit="step") as bar:
        for step in bar:
            if step == untimed:
                synchronize(device)
                start = time.perf_counter()
            batch = random_windows(train_data, args.batch_size, args.seq_len, generator).to(device)
            loss = next_token_loss(model, batch, autocast)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 10 == 0 or step == args.steps - 1:
                value = loss.item()  # a host sync, so only every few steps
                smoothed = value if smoothed is None else 0.7 * smoothed + 0.3 * value
                timed = step + 1 - untimed
                rate = timed * tokens_per_step / (time.perf_counter() - start) if timed > 0 else 0.0
                bar.set_postfix(loss=f"{smoothed:.3f}", tok_s=f"{rate:,.0f}")
    synchronize(device)
    timed_steps, train_time = args.steps - untimed, time.perf_counter() - start
    print(
        f"trained {args.steps} steps, {timed_steps * tokens_per_step / train_time:,.0f} tokens/s "
        f"(over the {timed_steps} steps after the first {untimed})"
    )

    model.eval()
    eval_generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        eval_batches = [
            random_windows(held_out_data, args.batch_size, args.seq_len, eval_generator).to(device)
            for _ in range(args.eval_batches)
        ]
        held_out = sum(next_token_loss(model, b, autocast).item() for b in eval_batches) / len(eval_batches)
    print(f"held-out loss: {held_out:.3f} nats/byte ({held_out / math.log(2):.2f} bits/byte)")

    out = Path(args.out)
    model.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).to(device).eval()
    with torch.no_grad():
        difference = (model(eval_batches[0]).logits - reloaded(eval_batches[0]).logits).abs().max().item()
    print(f"saved to {out}/ and reloaded through AutoModelForCausalLM: max |logits difference| = {difference:.1e}")

    prompt = torch.tensor([list(args.prompt.encode())], dtype=torch.long, device=device)
    with torch.no_grad(), autocast:
        sample = reloaded.generate(
            prompt, max_new_tokens=args.sample_len, do_sample=True, temperature=0.8, top_k=40, pad_token_id=0
        )
    print("sample:\n" + "-" * 60)
    print(bytes(sample[0].tolist()).decode("utf-8", errors="replace"))
    print("-" * 60)


if __name__ == "__main__":
    main()
