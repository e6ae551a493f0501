"""Smoke tests of the quality benchmarks at tiny sizes on the CPU: they train, evaluate and write
their CSVs; FLA's CUDA-only mixers stay in the table with the reason they did not run."""

import csv
import subprocess
import sys
from pathlib import Path

QUALITY = Path(__file__).parents[2] / "benchmarks" / "quality"


def run(script, tmp_path, *args):
    command = [sys.executable, str(QUALITY / script), "--device", "cpu", "--out", str(tmp_path), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def read(path):
    with open(path) as f:
        return {row["model"]: row for row in csv.DictReader(f)}


def test_mqar_smoke(tmp_path):
    # T = 128: mixed lengths train at 64 and 128
    args = ["--widths", "32", "--seq-lens", "128", "--steps", "4", "--batch-size", "4", "--vocab-size", "64"]
    args += ["--head-dim", "16", "--test-batches", "1", "--eval-every", "2"]
    args += ["--models", "attention", "fm_sparse_256_64", "gla"]
    out = run("mqar.py", tmp_path, *args)
    rows = read(tmp_path / "mqar.csv")
    assert "accuracy" in out and set(rows) == {"attention", "fm_sparse_256_64", "gla"}
    assert rows["attention"]["status"] == rows["fm_sparse_256_64"]["status"] == "ok"
    assert 0 <= float(rows["fm_sparse_256_64"]["accuracy"]) <= 1
    assert 0 < float(rows["fm_sparse_256_64"]["states_used"]) <= 1  # the routing diagnostics are logged
    assert rows["gla"]["status"].startswith("needs CUDA")
    with open(tmp_path / "mqar_curve.csv") as f:
        curve = [(row["model"], int(row["step"])) for row in csv.DictReader(f)]
    assert curve == [("attention", 2), ("attention", 4), ("fm_sparse_256_64", 2), ("fm_sparse_256_64", 4)]


def test_lm_smoke(tmp_path):
    args = ["--params", "2e5", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--steps", "3"]
    args += ["--batch-size", "2", "--seq-len", "64", "--eval-len", "256", "--eval-windows", "2"]
    run("lm.py", tmp_path, *args, "--models", "transformer", "fm_dense_256", "fm_sparse_256_4")
    rows = read(tmp_path / "lm.csv")
    params = [int(rows[name]["params"]) for name in rows]
    assert max(params) / min(params) < 1.05  # equal parameters, within the MLP's granularity
    assert float(rows["transformer"]["vs_transformer"]) == 1.0
    assert float(rows["fm_sparse_256_4"]["entropy"]) > 0
    with open(tmp_path / "lm_curve.csv") as f:
        positions = [int(row["position"]) for row in csv.DictReader(f) if row["model"] == "fm_dense_256"]
    assert positions[0] == 1 and positions[-1] == 256
