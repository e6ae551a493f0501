"""Byte-level text that needs no download, for the example and the quality benchmarks: the Python
standard library's own source files, split by file into training and held-out streams."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch


def stdlib_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """The stdlib's .py files (its test suite left out) as two uint8 streams ``[n_train]`` and
    ``[n_held_out]``: about 95% of the files for training and 5% held out, chosen by a hash of
    the file name, so the split is the same on every machine with the same Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held_out = bytearray(), bytearray()
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(("test/", "idlelib/idle_test/")) or "site-packages" in relative:
            continue
        bucket = held_out if hashlib.md5(relative.encode()).digest()[0] < 13 else train
        bucket += path.read_bytes() + b"\n\n"
    if not train or not held_out:
        raise RuntimeError(f"found no Python sources under {root}")
    return torch.frombuffer(train, dtype=torch.uint8), torch.frombuffer(held_out, dtype=torch.uint8)


def random_windows(data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch_size, seq_len + 1]`` int64 byte windows of ``data`` at random offsets."""
    if len(data) <= seq_len + 1:
        raise ValueError(f"windows of {seq_len + 1} bytes need more than the {len(data)} bytes given")
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
