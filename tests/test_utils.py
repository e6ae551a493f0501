"""``fla_factmem.utils``: the device guard of the Triton paths, with a model on a GPU that is
not the current one (as Hugging Face's ``device_map`` places layers)."""

import contextlib

import pytest
import torch
from triton.runtime.jit import JITFunction

from fla_factmem.layers import FactorizationMemory
from fla_factmem.ops import chunk_factorization_memory, fused_recurrent_factorization_memory
from fla_factmem.ops.compiled_launch import CompiledLauncher
from fla_factmem.utils import on_device_of
from tests.utils import assert_close, make_inputs


def test_on_device_of_leaves_cpu_tensors_alone():
    assert isinstance(on_device_of(torch.zeros(1)), contextlib.nullcontext)


def run_ops_and_layer(device, topk):
    """The chunked op's outputs and gradients, a decode step, and the layer's forward without
    autograd, on ``device`` from the same seed (drawn on the CPU)."""
    torch.manual_seed(0)
    v, logits, eta, mu, h0 = make_inputs(2, 70, 2, 64, 32, torch.bfloat16, device)
    o, ht = chunk_factorization_memory(v, logits, eta, mu, topk=topk, initial_state=h0, output_final_state=True)
    grads = torch.autograd.grad((o.float().sum() + ht.sum()), (v, logits, eta, mu, h0))
    with torch.no_grad():
        step = fused_recurrent_factorization_memory(
            v[:, :1], logits[:, :1], eta[:, :1], mu[:, :1], topk=topk, initial_state=ht, output_final_state=True
        )
        layer = FactorizationMemory(64, num_heads=2, num_memories=64, topk=topk).to(device, torch.bfloat16)
        y = layer(torch.randn(2, 9, 64).to(device, torch.bfloat16))[0]
    return [o, ht, *grads, *step, y]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("topk", [None, 4])
def test_cuda_ops_and_layer_on_a_gpu_that_is_not_current(topk, monkeypatch):
    """On cuda:1 with cuda:0 current, every launch of ours goes to cuda:1 (forward and backward),
    cuda:0 is current again after, and the results are those on cuda:0. Recorded, not inferred
    from the values: with peer access on, a launch on cuda:0 could still read cuda:1's memory."""
    launches = []

    def recording(method):
        def record(self, *args, **kwargs):
            launches.append(torch.cuda.current_device())
            return method(self, *args, **kwargs)

        return record

    # the kept launchers bypass the JIT; the dense chunk kernels (and FLA's) go through it
    monkeypatch.setattr(CompiledLauncher, "launch", recording(CompiledLauncher.launch))
    monkeypatch.setattr(JITFunction, "run", recording(JITFunction.run))
    with torch.cuda.device(0):
        reference = run_ops_and_layer("cuda:0", topk)
        launches.clear()
        moved = run_ops_and_layer("cuda:1", topk)
        assert torch.cuda.current_device() == 0
    assert launches and set(launches) == {1}, f"launches on devices {sorted(set(launches))}"
    for i, (x, ref) in enumerate(zip(moved, reference)):
        assert x.device == torch.device("cuda:1")
        assert_close(f"output {i}", x.cpu(), ref.cpu(), 1e-2)  # bf16; atomics may order sums otherwise
