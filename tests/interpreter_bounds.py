"""Out-of-bounds lanes of Triton kernels run by the interpreter (TRITON_INTERPRET=1).

The interpreter runs a masked load or store on whatever addresses its unmasked lanes hold and
does not check them; on a GPU such a lane may fault or read another tensor's memory. Within
``out_of_bounds_lanes()`` every interpreted load and store records its unmasked lanes that fall
outside the storage of every tensor argument of the running kernel. It relies on private parts
of Triton's interpreter; ``MISSING_HOOKS`` names those a Triton lacks, for tests to skip on.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
from triton.runtime import interpreter

HOOKS = (
    "GridExecutor._init_args_hst",
    "InterpreterBuilder.create_masked_load",
    "InterpreterBuilder.create_masked_store",
    "_get_np_dtype",
)


def missing_hooks() -> list[str]:
    """The private parts of the interpreter that ``out_of_bounds_lanes`` uses and this Triton lacks."""
    missing = []
    for name in HOOKS:
        owner = interpreter
        for part in name.split("."):
            owner = getattr(owner, part, None)
        if owner is None:
            missing.append(name)
    return missing


# looked up once: the autouse fixture in tests/conftest.py asks before every test
MISSING_HOOKS = missing_hooks()


@contextlib.contextmanager
def out_of_bounds_lanes():
    """Yields a Counter of (kernel name, "load" or "store") -> lanes that fell outside every
    tensor argument's storage, filled while the block runs."""
    bad: Counter = Counter()
    ranges: list[tuple[int, int]] = []
    kernel = None
    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    init_args, load, store = executor._init_args_hst, builder.create_masked_load, builder.create_masked_store

    def init_args_checked(self, args_dev, kwargs):
        nonlocal kernel
        args, kw = init_args(self, args_dev, kwargs)
        ranges.clear()
        kernel = self.fn.__name__
        for x in (*args, *kw.values()):
            if hasattr(x, "untyped_storage"):
                storage = x.untyped_storage()
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        return args, kw

    def check(kind, ptrs, mask):
        lanes = ptrs.data.ravel() if mask is None else ptrs.data[mask.data.astype(bool)]
        if lanes.size:
            size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
            inside = np.zeros(lanes.shape, dtype=bool)
            for lo, hi in ranges:
                inside |= (lanes >= lo) & (lanes + size <= hi)
            if not inside.all():
                bad[(kernel, kind)] += int((~inside).sum())

    def load_checked(self, ptrs, mask, *args):
        check("load", ptrs, mask)
        return load(self, ptrs, mask, *args)

    def store_checked(self, ptrs, value, mask, *args):
        check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *args)

    executor._init_args_hst = init_args_checked
    builder.create_masked_load, builder.create_masked_store = load_checked, store_checked
    try:
        yield bad
    finally:
        executor._init_args_hst = init_args
        builder.create_masked_load, builder.create_masked_store = load, store
