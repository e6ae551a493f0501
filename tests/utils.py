"""Input makers and comparisons shared by the tests."""

from __future__ import annotations

import torch

from fla_factmem.ops.factorization_memory.naive import naive_factorization_memory


def make_inputs(B, T, H, M, V, dtype=torch.float32, device="cpu", logit_scale=1.0, with_state=True, N=None):
    """Random (v, logits, eta, mu, h0) leaf tensors that require grad; h0 is float32 [N, H, M, V]."""

    def leaf(x):
        return x.to(device).requires_grad_()

    v = leaf(torch.randn(B, T, H, V, dtype=dtype))
    logits = leaf((torch.randn(B, T, H, M) * logit_scale).to(dtype))
    eta = leaf(torch.rand(B, T, H, dtype=dtype))
    mu = leaf(torch.rand(B, T, H, dtype=dtype))
    h0 = leaf(torch.randn(N or B, H, M, V)) if with_state else None
    return v, logits, eta, mu, h0


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; an all-zero reference is measured against an RMS of 1e-8,
    an empty one is matched by any empty x (assert_close checks the shapes)."""
    if ref.numel() == 0:
        return 0.0
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-8 * ref.numel() ** 0.5)).item()


def assert_close(name: str, x: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(x).all(), f"{name}: NaN or Inf in the result"
    err = rel_err(x, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def unaligned(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` whose address is one element past a 16-byte boundary."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:]
    return flat.view_as(x).copy_(x)


def cuda_decode_calls(topk):
    """One-token decode inputs on the GPU (B=8, H=4, V=64, bf16; M = 256 dense, 1024 with top-K)
    as three kinds of call, each (v, logits, eta, mu, cu_seqlens): aligned; unaligned (compiled
    without aligned loads); one token per sequence of a varlen batch. Returns the calls, a float32
    state h0 [8, 4, M, 64], and the naive op's output and final state from h0."""
    M = 256 if topk is None else 1024
    inputs = [torch.randn(8, 1, 4, 64), torch.randn(8, 1, 4, M) * 2, torch.rand(8, 1, 4), torch.rand(8, 1, 4)]
    v, logits, eta, mu = (x.cuda().bfloat16() for x in inputs)
    h0 = torch.randn(8, 4, M, 64, device="cuda")
    o_ref, ht_ref = naive_factorization_memory(v, logits, eta, mu, topk, h0, True)
    packed = [x.transpose(0, 1) for x in (v, logits, eta, mu)]
    calls = [
        (v, logits, eta, mu, None),
        (*(unaligned(x) for x in (v, logits, eta, mu)), None),
        (*packed, torch.arange(9, device="cuda")),
    ]
    return calls, h0, o_ref, ht_ref


def offsets_of(lengths, device="cpu") -> torch.Tensor:
    """``cu_seqlens`` [len(lengths) + 1] of sequences of these lengths packed along T."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)


def output_and_grads(fn, tensors, dout):
    """``fn(*tensors)`` on detached copies that require grad (None stays None), and the gradients
    of its output, for ``dout``, on each tensor that is not None: ``(y, *grads)``."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
    y = fn(*leaves)
    return (y, *torch.autograd.grad(y, [t for t in leaves if t is not None], dout))


def run_with_grads(fn, inputs, topk, dout=None, dht=None, **kwargs):
    """Runs ``fn`` on (v, logits, eta, mu, h0), backpropagates ``dout`` (and ``dht`` into the final
    state) and returns the output, the final state and the gradients of every input."""
    v, logits, eta, mu, h0 = inputs
    for x in inputs:
        if x is not None:
            x.grad = None
    o, ht = fn(v, logits, eta, mu, topk=topk, initial_state=h0, output_final_state=True, **kwargs)
    dout = torch.randn_like(o) if dout is None else dout
    dht = torch.randn_like(ht) if dht is None else dht
    ((o * dout).sum() + (ht * dht).sum()).backward()
    grads = [None if x is None else x.grad.clone() for x in inputs]
    return o.detach(), ht.detach(), grads, dout, dht


GRAD_NAMES = ("dv", "dlogits", "deta", "dmu", "dh0")


def assert_matches(fn, ref_fn, inputs, topk, fwd_tol, bwd_tol, cu_seqlens=None, **kwargs):
    """``fn`` (called with ``kwargs``) and ``ref_fn`` give the same output, final state and input gradients."""
    o_ref, ht_ref, g_ref, dout, dht = run_with_grads(ref_fn, inputs, topk, cu_seqlens=cu_seqlens)
    o, ht, g, _, _ = run_with_grads(fn, inputs, topk, dout=dout, dht=dht, cu_seqlens=cu_seqlens, **kwargs)
    assert_close("o", o, o_ref, fwd_tol)
    assert_close("final state", ht, ht_ref, fwd_tol)
    for name, a, b in zip(GRAD_NAMES, g, g_ref):
        if b is not None:
            assert_close(name, a, b, bwd_tol)
