"""The prepared GPU check (benchmarks/gpu_check.sh): its dry run end to end on this machine, and
its refusal to measure anything when JAX is not on a GPU."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = ["profile", "grouped_mlp", "attention", "train", "decode", "vs_transformers", "tests", "fp8"]


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
    proc = _run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], tmp_path, timeout=1200)
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {name: step["status"] for name, step in report["steps"].items()}
    assert statuses == dict.fromkeys(STEPS, "ok"), (statuses, proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = {name: step["numbers"] for name, step in report["steps"].items()}
    for part in ("train", "decode"):
        profile = steps["profile"][part]
        assert profile["kernels_traced"] > 0 and profile["top_kernels"], profile
        assert {"attention", "grouped_mlp", "router"} <= set(profile["phases_ms_per_step"]), profile
        assert 0 < profile["busy_ms_per_step"] <= profile["wall_ms_per_step"], profile
    assert "optimizer" in steps["profile"]["train"]["phases_ms_per_step"]
    rows = steps["grouped_mlp"]["rows"]
    measured = {row["backend"] for row in rows if "skipped" not in row}
    assert measured == {"dense GEMM", "triton", "ragged", "tiled", "torch"}, rows
    assert [row["backend"] for row in rows if "skipped" in row] == ["pallas_mgpu"], "Mosaic GPU needs a Hopper GPU"
    attention = steps["attention"]
    for name in ("cudnn", "xla", "blocked"):  # float32 in the dry run: all three agree to rounding
        assert attention[name]["max_abs_error_vs_f32"] < 1e-5 and attention[name]["forward_backward_ms"] > 0, attention
    assert attention["auto_resolves_to"] == "blocked", attention
    train = steps["train"]
    assert math.isfinite(train["loss"]) and 0 < train["mfu"] < 1.5 and train["tokens_per_s"] > 0, train
    for batch in ("batch_1", "batch_64"):
        decode = steps["decode"][batch]
        assert decode["tokens_per_s"] > 0 and decode["hbm_bound_ms"] > 0, steps["decode"]
    spec = steps["decode"]["speculative"]
    assert spec["pass_over_step"] > 0 and spec["speedup_at_84pct_acceptance"] > 0, spec
    peer = steps["vs_transformers"]["results"][0]
    assert peer["parity_max_abs_diff"] < 1e-4 and set(peer["seconds"]) == {"train", "decode_b1"}, peer
    assert report["owed"] and "two GPUs" in report["owed"][0], report["owed"]
    fp8 = steps["fp8"]
    assert math.isfinite(fp8["train"]["loss"]) and fp8["train"]["tokens_per_s"] > 0, fp8
    assert {row["backend"] for row in fp8["grouped_mlp"] if "skipped" not in row} >= {"tiled", "tiled_fp8"}, fp8
    assert "===== train: ok" in (tmp_path / "gpu_check.log").read_text()


def test_every_step_has_a_time_box_and_the_check_fits_in_ten_minutes():
    check = _gpu_check_module()
    assert set(check.TIME_BOX) == set(check.DRY_TIME_BOX) == set(check.STEPS) == set(STEPS), check.TIME_BOX
    assert list(check.STEPS)[0] == "profile", "the profile comes first: whatever else times out, it is back"
    installing = 15  # seconds: the wheels, with --no-deps, and the project, editable
    assert sum(check.TIME_BOX.values()) + installing <= 10 * 60, check.TIME_BOX


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan nobody reaped yet has finished)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("ending", ["timeout", "exit"])
def test_a_step_is_stopped_with_its_children(tmp_path, ending):
    """A child the step started (a benchmark) must not outlive the step's time box, nor the step:
    on a GPU it would keep the device's memory from the next step."""
    pid_file = tmp_path / "child.pid"
    wait = "wait" if ending == "timeout" else "exit 0"
    script = f"sleep 300 & echo $! > {pid_file}; echo started; {wait}"
    t0 = time.perf_counter()
    status, log = _gpu_check_module().run_boxed(["bash", "-c", script], box=3)
    assert time.perf_counter() - t0 < 30, "the step's child held the check up"
    assert status == ("timeout after 3 s" if ending == "timeout" else "ok"), status
    assert "started" in log, log
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while _running(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _running(child), f"the step's child {child} is still running"
