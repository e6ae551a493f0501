"""``RotaryEmbedding``: FLA's convention at explicit positions, in float32 angles whatever the
model's dtype."""

import pytest
import torch
from fla.modules.rotary import rotary_embedding_ref

from fla_factmem.modules import RotaryEmbedding
from tests.utils import assert_close


def test_rotary_matches_flas_reference_at_explicit_positions():
    rotary = RotaryEmbedding(16)
    q, k = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 2, 16)
    positions = torch.randint(0, 5000, (2, 7))
    freqs = positions[..., None].float() * rotary.inv_freq
    q_rot, k_rot = rotary(q, k, positions)
    assert_close("q", q_rot, rotary_embedding_ref(q, freqs.cos(), freqs.sin()), 1e-5)
    assert_close("k", k_rot, rotary_embedding_ref(k, freqs.cos(), freqs.sin()), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_angles_stay_float32_in_a_cast_model(dtype):
    """``.to(dtype)`` leaves the frequencies float32, so the angles are float32's (bf16 frequencies
    put them 1.75 rad off at position 4000)."""
    rotary, cast = RotaryEmbedding(64), RotaryEmbedding(64).to(dtype)
    assert cast.inv_freq.dtype == torch.float32
    q, k = torch.randn(1, 5, 2, 64, dtype=dtype), torch.randn(1, 5, 2, 64, dtype=dtype)
    positions = torch.tensor([0, 1, 100, 1000, 4000])
    for got, want in zip(cast(q, k, positions), rotary(q, k, positions)):
        assert torch.equal(got, want)
