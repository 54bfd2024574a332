"""The prepared GPU check (benchmarks/gpu_check.sh): its dry run end to end on this machine, and
its refusal to measure anything when JAX is not on a GPU."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(args, out, **kwargs):
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, **kwargs)


def test_without_a_gpu_the_check_refuses_and_says_why(tmp_path):
    proc = _run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)], tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not on the GPU" in proc.stderr and "--no-deps" in proc.stderr, proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["steps"] == {} and report["environment"]["backend"] == "cpu", report


def test_unknown_step_is_a_clear_error(tmp_path):
    proc = _run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--steps", "train,flash"], tmp_path,
                timeout=60)
    assert proc.returncode == 2 and "unknown steps ['flash']" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_dry_run_runs_every_step_and_reports_its_numbers(tmp_path):
    proc = _run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], tmp_path, timeout=900)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {name: step["status"] for name, step in report["steps"].items()}
    assert statuses == dict.fromkeys(["kernels", "grouped_mlp", "attention", "train", "decode", "tests"], "ok"), (
        statuses, proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = {name: step["numbers"] for name, step in report["steps"].items()}
    backends = {row["backend"] for row in steps["grouped_mlp"]["rows"]}
    assert backends == {"dense GEMM", "triton", "ragged", "tiled"}, backends
    attention = steps["attention"]
    for name in ("cudnn", "xla", "blocked"):  # float32 in the dry run: all three agree to rounding
        assert attention[name]["max_abs_error_vs_f32"] < 1e-5 and attention[name]["forward_backward_ms"] > 0, attention
    assert attention["auto_resolves_to"] == "blocked", attention
    train = steps["train"]
    assert math.isfinite(train["loss"]) and 0 < train["mfu"] < 1.5 and train["tokens_per_s"] > 0, train
    for batch in ("batch_1", "batch_64"):
        assert steps["decode"][batch]["tokens_per_s"] > 0 and steps["decode"][batch]["hbm_bound_ms"] > 0, steps["decode"]
    assert report["owed"] and "two GPUs" in report["owed"][0], report["owed"]
    assert "===== train: ok" in (tmp_path / "gpu_check.log").read_text()
