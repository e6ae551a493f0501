"""A first look at the Factorization Memory ops: run them, check them, time them.

    python examples/ops_demo.py [--device cpu|cuda] [--seq-len 512]

Runs the chunked op dense and sparse on random inputs, compares it and its gradients with
the step-by-step definition, and decodes one more token with the recurrent op from the
chunked op's final state.
"""

import argparse
import time

import torch

from fla_factmem.ops import chunk_factorization_memory, fused_recurrent_factorization_memory, naive_factorization_memory


def rel_err(x, ref):
    # the floor keeps an all-zero reference finite (with K = 1 each token's one weight is 1: no
    # gradient reaches the logits)
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12)).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--memories", type=int, default=32, help="M, memory states per head")
    parser.add_argument("--head-dim", type=int, default=32, help="V, width of one state")
    args = parser.parse_args()
    B, T, H, M, V = 2, args.seq_len, args.heads, args.memories, args.head_dim
    dev = args.device
    print(f"Factorization Memory on {dev}: B={B} T={T} H={H} M={M} V={V}")

    v = torch.randn(B, T, H, V, device=dev, requires_grad=True)
    logits = (2 * torch.randn(B, T, H, M, device=dev)).requires_grad_()
    eta = torch.rand(B, T, H, device=dev, requires_grad=True)
    mu = torch.rand(B, T, H, device=dev, requires_grad=True)

    for topk in (None, max(1, M // 4)):
        name = "dense" if topk is None else f"sparse K={topk}"
        start = time.perf_counter()
        o, state = chunk_factorization_memory(v, logits, eta, mu, topk=topk, output_final_state=True)
        o.square().sum().backward()
        elapsed = time.perf_counter() - start
        grads = [x.grad.clone() for x in (v, logits, eta, mu)]
        for x in (v, logits, eta, mu):
            x.grad = None
        o_ref, _ = naive_factorization_memory(v, logits, eta, mu, topk=topk)
        o_ref.square().sum().backward()
        errs = [rel_err(g, x.grad) for g, x in zip(grads, (v, logits, eta, mu))]
        for x in (v, logits, eta, mu):
            x.grad = None
        print(
            f"  {name:>12}: chunked forward+backward {elapsed * 1e3:8.1f} ms | rel. error vs definition: "
            f"o {rel_err(o, o_ref):.1e}, grads (v, logits, eta, mu) {', '.join(f'{e:.1e}' for e in errs)}"
        )

        with torch.no_grad():
            step = [torch.randn_like(x[:, -1:]) for x in (v, logits)] + [torch.rand_like(x[:, -1:]) for x in (eta, mu)]
            o_step, state = fused_recurrent_factorization_memory(
                *step, topk=topk, initial_state=state, output_final_state=True
            )
        print(f"  {name:>12}: decoded one more token from the final state, |o| = {o_step.norm():.3f}")


if __name__ == "__main__":
    main()
