import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be on before any kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.interpreter_bounds import MISSING_HOOKS, out_of_bounds_lanes  # noqa: E402


@pytest.fixture(autouse=True)
def kernels_stay_in_bounds(request):
    """Under the interpreter, no Triton kernel that a test runs loads or stores outside its tensors
    (tests/interpreter_bounds.py); tests marked ``out_of_bounds`` do so on purpose."""
    if os.environ.get("TRITON_INTERPRET") != "1" or MISSING_HOOKS or request.node.get_closest_marker("out_of_bounds"):
        yield
        return
    with out_of_bounds_lanes() as lanes:
        yield
    assert not lanes, f"Triton kernels loaded or stored outside their tensors (lanes by kernel): {dict(lanes)}"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_seed():
    """Every test draws fresh random inputs; the seed is printed so a failure can be replayed."""
    seed = int(os.environ.get("FLA_FACTMEM_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"seed: {seed} (set FLA_FACTMEM_SEED={seed} to replay)")
    yield
