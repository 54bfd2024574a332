"""Multi-process training for real: several CPU processes joined by jax.distributed and gloo
(``train.distributed.initialize_distributed``, ``train/launch_local.sh``), experts spread across them."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax import errors

REPO = pathlib.Path(__file__).resolve().parents[1]
# 16 experts over an expert axis of 4: with 4 devices per process the all_to_all stays inside a
# process and the data axis crosses processes; with 2 x 4 and expert=8 the exchange crosses too.
RUN = ["--config", "tiny", "--set", "moe.n_routed_experts=16", "--set", "train.log_every=1",
       "--set", "train.eval_every=1000", "--set", "train.eval_tokens=4096", "--set", "train.checkpoint_every=3",
       "--quiet"]


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _train_one_process(workdir, *extra, devices=8):
    subprocess.run([sys.executable, "-m", "dsmoe_jax.cli", "train", *RUN, "--workdir", str(workdir), *extra],
                   env=_env(devices), check=True, capture_output=True, timeout=600)


def _launch_local(workdir, *extra, processes=2, devices=4):
    out = subprocess.run(["bash", str(REPO / "train" / "launch_local.sh"), str(processes), str(devices), *RUN,
                          "--workdir", str(workdir), *extra], env=_env(devices), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout + out.stderr


def _losses(workdir) -> dict[int, float]:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines)}


def _signal_a_peer_mid_run(workdir, signum: int, *extra: str, port: int) -> tuple[int, str, float]:
    """Train with two processes until 8 steps are logged, send process 1 ``signum``, and wait for
    process 0 to end: its exit code, its stderr and the seconds it took after the signal."""
    args = [*RUN, "--set", "mesh.expert=4", *extra, "--workdir", str(workdir), "--coordinator", f"127.0.0.1:{port}",
            "--num-processes", "2"]
    procs = [subprocess.Popen([sys.executable, "-m", "dsmoe_jax.cli", "train", *args, "--process-id", str(i)],
                              env=_env(4), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        deadline = time.monotonic() + 300
        while len(_losses(workdir)) < 8 if (workdir / "metrics.jsonl").is_file() else True:
            assert time.monotonic() < deadline and procs[0].poll() is None, "the run did not get going"
            time.sleep(0.2)
        procs[1].send_signal(signum)
        signalled = time.monotonic()
        _, stderr = procs[0].communicate(timeout=120)
        return procs[0].returncode, stderr, time.monotonic() - signalled
    finally:
        for p in procs:
            p.kill()


@pytest.mark.slow  # about 100 s: run with -m slow
def test_two_processes_match_one_and_resume_on_another_mesh(tmp_path):
    _train_one_process(tmp_path / "one", "--set", "train.steps=6", "--set", "mesh.expert=4")
    _launch_local(tmp_path / "two", "--set", "train.steps=3", "--set", "mesh.expert=8")
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    for step in (1, 2, 3):
        assert abs(one[step] - two[step]) < 1e-5, (step, one[step], two[step])

    # the 2-process checkpoint (expert=8 across processes) restores in one process on expert=4
    p_one, _ = dsmoe_jax.load_checkpoint(tmp_path / "one", step=3)
    p_two, _ = dsmoe_jax.load_checkpoint(tmp_path / "two", step=3)
    for a, b in zip(jax.tree.leaves(p_one), jax.tree.leaves(p_two)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    _train_one_process(tmp_path / "two", "--set", "train.steps=6", "--set", "mesh.expert=4", "--resume")
    resumed = _losses(tmp_path / "two")
    for step in (4, 5, 6):
        assert abs(one[step] - resumed[step]) < 1e-4, (step, one[step], resumed[step])



@pytest.mark.slow  # about 70 s: run with -m slow
def test_a_killed_process_stops_the_others_and_the_run_resumes(tmp_path):
    workdir = tmp_path / "run"
    returncode, stderr, stopped_after = _signal_a_peer_mid_run(
        workdir, signal.SIGKILL, "--set", "train.steps=60", "--heartbeat-timeout", "10",
        port=20000 + os.getpid() % 20000)
    assert returncode != 0
    assert stopped_after < 60, f"the surviving process took {stopped_after:.0f} s to stop"
    assert "another process" in stderr or "task died" in stderr, stderr[-3000:]

    last_checkpoint = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    logged = len(_losses(workdir))
    output = _launch_local(workdir, "--set", "train.steps=12", "--set", "mesh.expert=4", "--resume")
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)), f"each step logged once after the resume: {steps}"
    # it resumed from the last checkpoint: the steps logged after it were dropped and run again
    assert logged == last_checkpoint or f"lines logged after step {last_checkpoint}" in output, (
        logged, last_checkpoint, output[-2000:])


@pytest.mark.slow  # about 60 s: run with -m slow
def test_a_hung_process_is_named_by_the_others_with_the_checkpoint_to_resume_from(tmp_path):
    """kill -STOP one process: the other waits in a collective; after train.step_timeout it says
    that a peer has probably stopped and which checkpoint to resume from, and exits with
    TrainingError's code (JAX's own heartbeat would abort it later, without saying either)."""
    workdir = tmp_path / "run"
    returncode, stderr, waited = _signal_a_peer_mid_run(
        workdir, signal.SIGSTOP, "--set", "train.steps=200", "--set", "train.step_timeout=10", "--heartbeat-timeout",
        "300", port=20000 + (os.getpid() + 7) % 20000)
    assert returncode == errors.TrainingError.exit_code, (returncode, stderr[-3000:])
    assert waited < 60, f"the waiting process took {waited:.0f} s to stop"
    checkpoint = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert re.search(rf"process 0 of 2: step \d+ has not finished after 10 s \(train.step_timeout\): another "
                     rf"process has probably stopped.*rerun them all with --resume; the last complete checkpoint is "
                     rf"step {checkpoint}", stderr), stderr[-3000:]
