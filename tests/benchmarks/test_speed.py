"""Smoke tests of the end-to-end speed benchmarks at tiny sizes on the CPU: they time or profile
the models and write their CSVs and plots; FLA's CUDA-only mixers stay in the table with the
reason."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
TINY = ["--params", "2e5", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--vocab-size", "64"]
MODELS = ["--models", "transformer", "gla", "fm_dense_64", "fm_sparse_1024_16"]


def run(script, tmp_path, *args):
    command = [sys.executable, str(BENCHMARKS / script), "--device", "cpu", "--out", str(tmp_path), *TINY, *MODELS]
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(next(tmp_path.glob("*.csv"))) as f:
        return list(csv.DictReader(f))


def test_training_throughput_smoke(tmp_path):
    rows = run("benchmark_training_throughput.py", tmp_path, "--seq-lens", "32", "--batch-tokens", "128")
    assert len(rows) == 4 and (tmp_path / "training_throughput.png").exists()
    for row in rows:
        if row["model"] == "gla":
            assert row["status"].startswith("needs CUDA")
        else:
            assert row["status"] == "ok" and float(row["tokens_per_s"]) > 0
            assert int(row["batch_size"]) * int(row["seq_len"]) == 128


def test_generation_smoke(tmp_path):
    args = ["--contexts", "16", "40", "--batch-sizes", "1", "2", "--decode-tokens", "3", "--warmup-context", "8"]
    rows = run("benchmark_generation.py", tmp_path, *args, "--max-tokens", "60")
    assert len(rows) == 16 and (tmp_path / "generation.png").exists()
    for row in rows:
        if row["model"] == "gla":
            assert row["status"].startswith("needs CUDA")
        elif int(row["context"]) * int(row["batch_size"]) > 60:
            assert row["status"].startswith("skipped") and row["prefill_ms"] == ""
        else:
            assert row["status"] == "ok" and float(row["decode_tokens_per_s"]) > 0 and float(row["prefill_ms"]) > 0


def test_profile_kernels_smoke(tmp_path):
    args = ["--seq-len", "32", "--batch-tokens", "64", "--prompt", "8", "--decode-steps", "2", "--top", "3"]
    rows = run("profile_kernels.py", tmp_path, *args)
    assert (tmp_path / "profile_kernels.png").exists()
    assert [r["status"] for r in rows if r["model"] == "gla"] == ["needs CUDA (FLA's Triton kernels)"]
    for model in ("transformer", "fm_dense_64", "fm_sparse_1024_16"):
        for phase in ("train", "decode"):
            entries = [r for r in rows if r["model"] == model and r["phase"] == phase]
            assert entries and all(r["status"] == "ok" and float(r["ms_per_step"]) > 0 for r in entries)


@pytest.mark.parametrize("phase", ["train", "decode"])
def test_in_turns_smoke(tmp_path, phase):
    args = ["--phase", phase, "--seq-len", "32", "--batch-tokens", "64", "--decode-batch", "2", "--prompt", "8"]
    rows = run("benchmark_in_turns.py", tmp_path, *args, "--warmup", "1", "--rounds", "3", "--steps", "1")
    assert [r["model"] for r in rows] == MODELS[1:] and (tmp_path / "in_turns.png").exists()
    for row in rows:
        if row["model"] == "gla":
            assert row["status"].startswith("needs CUDA")
        else:
            assert row["status"] == "ok" and row["phase"] == phase and len(row["round_medians"].split()) == 3
            assert float(row["ms_per_step"]) > 0
    assert float(rows[0]["throughput_over_first"]) == 1.0
