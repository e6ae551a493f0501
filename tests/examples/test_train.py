"""The README's main command, at a tiny size: it trains, evaluates, saves, reloads and samples."""

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).parents[2] / "examples" / "train.py"


def test_train_example_runs_end_to_end(tmp_path):
    args = [
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--hidden-size",
        "32",
        "--num-heads",
        "2",
        "--num-memories",
        "4",
        "--topk",
        "2",
        "--eval-batches",
        "1",
        "--sample-len",
        "8",
        "--out",
        str(tmp_path / "model"),
        "--device",
        "cpu",
    ]
    result = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "held-out loss" in out and "max |logits difference| = 0.0e+00" in out and "sample:" in out
    assert (tmp_path / "model" / "config.json").exists()


def test_train_example_refuses_bad_options_before_training():
    for args, message in [(["--sample-len", "0"], "--sample-len must be >= 1"), (["--prompt="], "--prompt must not")]:
        result = subprocess.run([sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=600)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
