"""``GraphDecoder`` (benchmarks/graph_decoding.py) on the GPU: its replays decode the same tokens
and states as eager decoding, for mixers that update their state in place (ours) and for those
that return a new one (FLA's); a model with attention is refused before any capture."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from contenders import CONTENDERS, build_model  # noqa: E402
from graph_decoding import GraphDecoder  # noqa: E402


def tiny_model(name: str, device: str = "cuda", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    return build_model(CONTENDERS[name], 2e6, 128, 2, 2, 256, 64, torch.device(device), dtype).eval()


def prefill(model, prompt):
    out = model(input_ids=prompt, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "name, dtype",
    [
        ("fm_dense_64", torch.float32),
        ("fm_sparse_1024_16", torch.float32),
        ("gla", torch.float32),
        # in float32 at head_dim = state_size = 128, FLA's chunk_gla_fwd_kernel_o (our Mamba-2's
        # prefill) fails with 'misaligned address' on an H200 under Triton 3.6; bfloat16 runs
        ("mamba2", torch.bfloat16),
    ],
)
@torch.no_grad()
def test_graph_replays_decode_like_eager_steps(name, dtype):
    model = tiny_model(name, dtype=dtype)
    prompt = torch.randint(1, 256, (3, 20), device="cuda")
    cache, token = prefill(model, prompt)
    eager = []
    for _ in range(6):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        eager.append(token)

    graph_cache, token = prefill(model, prompt)
    decoder = GraphDecoder(model, graph_cache, token)  # its warm-up decodes eager[0]
    assert torch.equal(decoder.token, eager[0])
    replayed = [decoder.step().clone() for _ in range(5)]
    assert torch.equal(torch.cat(replayed, 1), torch.cat(eager[1:], 1))
    for layer_idx in range(len(cache)):  # every state: the recurrent one and the convolutions'
        for key, theirs in cache[layer_idx].items():
            ours = graph_cache[layer_idx][key]
            if theirs is None:
                assert ours is None, key
                continue
            pairs = [(ours, theirs)] if isinstance(theirs, torch.Tensor) else list(zip(ours, theirs, strict=True))
            for a, b in pairs:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"layer {layer_idx} {key}")


@torch.no_grad()
def test_attention_models_are_refused():
    model = tiny_model("transformer", "cpu")
    cache, token = prefill(model, torch.randint(1, 256, (1, 8)))
    with pytest.raises(ValueError, match="KV cache"):
        GraphDecoder(model, cache, token)
