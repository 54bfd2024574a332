"""The training loop end to end: learning, logs, kill -9 and resume, non-finite losses."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import dsmoe_jax
from dsmoe_jax import data, load_config
from dsmoe_jax.errors import CheckpointError, TrainingError, TrainingInterrupted
from dsmoe_jax.evaluation import evaluate
from dsmoe_jax.train import loop as loop_lib
from dsmoe_jax.train import step as step_lib
from dsmoe_jax.train.loop import train

FAST = ["train.batch_size=8", "train.seq_len=64", "train.warmup_steps=5", "train.log_every=1", "train.eval_tokens=8192"]


def _metrics(workdir) -> dict[int, dict]:
    """The logged record of each step; asserts that no step was logged twice."""
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice: {sorted(s for s in set(steps) if steps.count(s) > 1)}"
    return {r["step"]: r for r in rows}


def test_tiny_config_learns_and_logs(tmp_path):
    cfg = load_config("tiny", FAST + ["train.steps=40", "train.eval_every=20", "train.checkpoint_every=20"])
    _, val, _ = data.load_tokens(cfg)
    initial = evaluate(dsmoe_jax.init_params(cfg.model, jax.random.key(cfg.train.seed)), cfg, val).loss
    last = train(cfg, tmp_path, progress=False)
    assert last.val_loss < initial - 2.0, f"validation loss {initial:.2f} -> {last.val_loss:.2f}"
    m = _metrics(tmp_path)
    assert sorted(m) == list(range(1, 41))
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "balance_loss"} <= set(m[1])
    assert "val_loss" in m[20] and "val_loss" not in m[19]
    assert "load_max_over_mean/moe_layer_2" in m[40], "per-layer expert load"
    gates = [m[40][f"gate_sum/moe_layer_{i}"] for i in range(3)]
    assert all(0 < g <= 1 for g in gates), f"top-k softmax gates sum to at most 1 per token: {gates}"
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["20", "40"]


def test_top_p_routing_trains_and_logs_its_experts_per_token(tmp_path):
    """Dynamic routing's statistics reach the log: experts per token for each MoE layer (between
    1 and the routed experts) and its weighted entropy loss, part of the balance loss."""
    cfg = load_config("tiny", FAST + ["train.steps=3", "train.eval_every=3", "train.checkpoint_every=3",
                                      "moe.routing=top_p", "moe.top_p=0.4", "moe.dynamic_loss_weight=1e-4"])
    train(cfg, tmp_path, progress=False)
    m = _metrics(tmp_path)[3]
    E = cfg.model.moe.n_routed_experts
    active = [m[f"active_experts/moe_layer_{i}"] for i in range(cfg.model.n_moe_layers)]
    assert all(1 <= a <= E for a in active), active
    entropy = m["dynamic_loss"] / 1e-4 / len(active)  # summed over the MoE layers
    assert 0 < entropy <= np.log(E) + 1e-6, f"the router's mean entropy per layer, weighted: {m['dynamic_loss']}"
    assert m["balance_loss"] == pytest.approx(m["expert_balance_loss"] + m["device_balance_loss"] + m["dynamic_loss"],
                                              rel=1e-5)
    histograms = _tensorboard_histograms(tmp_path / "tensorboard")
    tokens = cfg.train.batch_size * cfg.train.seq_len
    for i, mean in enumerate(active):
        h = histograms[(f"experts_per_token/moe_layer_{i}", 3)]
        counts = np.asarray(h.bucket)
        assert len(counts) == E + 1 and counts.sum() == h.num == tokens, f"layer {i}: every token once: {h}"
        assert counts[0] == 0 and h.min >= 1, f"layer {i}: a token always takes an expert: {counts}"
        assert h.sum / h.num == pytest.approx(mean, rel=1e-5), f"layer {i}: the histogram's mean is the logged mean"


def _tensorboard_histograms(directory) -> dict:
    """{(tag, step): HistogramProto} from the TFRecord event files in ``directory`` (each record:
    8-byte length, 4-byte CRC, the Event, 4-byte CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for path in directory.glob("events.out.tfevents*"):
        raw = path.read_bytes()
        at = 0
        while at < len(raw):
            (length,) = struct.unpack("<Q", raw[at:at + 8])
            event = event_pb2.Event.FromString(raw[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("histo"):
                    out[(value.tag, event.step)] = value.histo
    return out


@pytest.mark.slow  # the default run stays near ten minutes: run with -m slow
def test_tiny_v3_learns_and_its_score_bias_balances_the_load(tmp_path):
    """DeepSeek-V3's parts (MLA, sigmoid group-limited routing, auxiliary-loss-free balancing)
    train: the loss falls and the bias moves. Without the bias (or an auxiliary loss) this
    router collapses within 5 steps (load max/mean 5.0: one expert per layer takes every
    token) and stays collapsed to step 40 (4.9); with it the load is pulled back (3.6 over
    the last 10 steps, measured)."""
    cfg = load_config("tiny-v3", FAST + ["train.steps=40", "train.eval_every=40", "train.checkpoint_every=40",
                                         "moe.bias_update_speed=0.01"])
    last = train(cfg, tmp_path, progress=False)
    m = _metrics(tmp_path)
    assert last.val_loss < m[1]["loss"] - 2.0, f"loss {m[1]['loss']:.2f} -> validation {last.val_loss:.2f}"
    imbalance = [np.mean([v for k, v in m[step].items() if k.startswith("load_max_over_mean/")]) for step in sorted(m)]
    assert np.mean(imbalance[-10:]) < max(imbalance) - 1.0, \
        f"the bias did not pull the load back from its peak: load max/mean by step {np.round(imbalance, 2)}"
    params, _ = dsmoe_jax.load_checkpoint(tmp_path)
    bias = np.asarray(params["layers"][1]["ffn"]["score_bias_E"])
    moves = bias / 0.01  # 40 steps of +-speed (or 0 at the exact mean): whole numbers in [-40, 40]
    assert np.abs(bias).max() > 0 and np.allclose(moves, np.round(moves), atol=1e-3) and np.abs(moves).max() <= 40, \
        f"the bias did not move by sign(mean load - load) steps: {moves}"


def _train_cmd(workdir, steps, resume=False, config="tiny"):
    script = pathlib.Path(sys.executable).parent / "dsmoe-jax"
    sets = FAST + [f"train.steps={steps}", "train.checkpoint_every=25", "train.eval_every=100000",
                   "train.batch_size=4", "train.seq_len=32"]
    cmd = [str(script), "train", "--config", config, "--workdir", str(workdir)]
    cmd += [a for s in sets for a in ("--set", s)]
    return cmd + (["--resume"] if resume else [])


@pytest.mark.slow  # about 60 s each: run with -m slow
@pytest.mark.parametrize("config", ["tiny", "tiny-v3"])  # tiny-v3: MLA, and the score bias is training state
def test_kill_9_and_resume_reproduces_the_uninterrupted_run(tmp_path, config):
    steps = 200
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(_train_cmd(whole, steps, config=config), check=True, capture_output=True)

    proc = subprocess.Popen(_train_cmd(broken, steps, config=config), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        log = broken / "metrics.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= 90:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_metrics(broken))
    assert killed_at < steps, "the run must be killed mid-way for this test to mean anything"

    subprocess.run(_train_cmd(broken, steps, resume=True, config=config), check=True, capture_output=True)
    a, b = _metrics(whole), _metrics(broken)  # each step logged once, though some ran twice
    assert sorted(b) == list(range(1, steps + 1))
    assert [a[s]["loss"] for s in range(1, steps + 1)] == [b[s]["loss"] for s in range(1, steps + 1)], \
        f"losses after resuming (killed at step {killed_at}) differ from the uninterrupted run"


def _on_call(monkeypatch, call: int, scale_then: float = 1.0, signum: int | None = None):
    """On the ``call``-th execution of the train step, scale the loss by ``scale_then`` (NaN
    poisons it) and/or send this process ``signum``, as a scheduler would while a step runs."""
    calls = {"n": 0}
    real = step_lib.loss_fn

    def count():
        calls["n"] += 1
        if calls["n"] == call and signum is not None:
            os.kill(os.getpid(), signum)
        return np.float32(scale_then if calls["n"] == call else 1.0)

    def instrumented(params, batch, cfg, counts=None):
        scale = jax.pure_callback(count, jax.ShapeDtypeStruct((), np.float32))
        loss, aux = real(params, batch, cfg, counts)
        return loss * scale, aux

    monkeypatch.setattr(step_lib, "loss_fn", instrumented)


def test_nan_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    _on_call(monkeypatch, 12, scale_then=np.nan)
    cfg = load_config("tiny", FAST + ["train.steps=20", "train.checkpoint_every=5", "train.eval_every=1000"])
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step 12 .*last checkpoint \(step 10\)"):
        train(cfg, tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "5"]
    params, _ = dsmoe_jax.load_checkpoint(tmp_path)
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


def test_nan_skip_mode_skips_the_step(tmp_path, monkeypatch):
    _on_call(monkeypatch, 7, scale_then=np.nan)
    cfg = load_config("tiny", FAST + ["train.steps=10", "train.checkpoint_every=10", "train.eval_every=1000",
                                      "train.on_nan='skip'"])
    train(cfg, tmp_path, progress=False)
    m = _metrics(tmp_path)
    assert np.isnan(m[7]["loss"]) and np.isfinite(m[8]["loss"]) and max(m) == 10
    params, _ = dsmoe_jax.load_checkpoint(tmp_path)
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


def test_sigterm_checkpoints_the_current_step_and_resume_continues_exactly(tmp_path, monkeypatch):
    cfg = load_config("tiny", FAST + ["train.steps=10", "train.checkpoint_every=100", "train.eval_every=1000"])
    _on_call(monkeypatch, 10**9, signum=signal.SIGTERM)  # the same program, never signalling
    train(cfg, tmp_path / "whole", progress=False)
    _on_call(monkeypatch, 4, signum=signal.SIGTERM)
    stopped = r"stopped by SIGTERM after step 4, with a checkpoint .*--resume"
    with pytest.raises(TrainingInterrupted, match=stopped) as e:
        train(cfg, tmp_path / "stopped", progress=False)
    assert e.value.exit_code == 143, "128 + SIGTERM, as a shell reports a job it terminated"
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == ["4"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the loop's handlers are gone after the run"
    _on_call(monkeypatch, 10**9, signum=signal.SIGTERM)
    last = train(cfg, tmp_path / "stopped", resume=True, progress=False)
    whole, stopped = _metrics(tmp_path / "whole"), _metrics(tmp_path / "stopped")
    assert [stopped[s]["loss"] for s in range(1, 11)] == [whole[s]["loss"] for s in range(1, 11)]
    assert (last.step, last.loss, last.val_loss) == (10, whole[10]["loss"], stopped[10]["val_loss"]), last
    assert last.val_curve == tuple((s, m["val_loss"]) for s, m in sorted(stopped.items()) if "val_loss" in m), \
        "the validation curve of the whole run, the steps before the interruption included"
    assert last.train_curve == tuple((s, whole[s]["ce"]) for s in sorted(whole)), "the training curve, every step"
    again = train(cfg, tmp_path / "stopped", resume=True, progress=False)
    assert (again.step, again.val_curve) == (10, last.val_curve), "nothing left to train: the curves logged before"


def test_resume_falls_back_past_a_damaged_checkpoint_and_logs_each_step_once(tmp_path, capfd, monkeypatch):
    # Python's own hook, not pytest's collector: an unraisable error is printed, as in a real run
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(1, 50)))
    cfg = load_config("tiny", FAST + ["train.steps=6", "train.checkpoint_every=3", "train.eval_every=1000"])
    train(cfg, run, progress=False)
    assert sorted(_metrics(run)) == list(range(1, 7)), "a fresh run replaces an old run's metrics, never appends"
    assert "dropped 49 lines logged after step 0" in capfd.readouterr().out
    # Damage the latest checkpoint's optimizer state: its data files cut in half (a disk error, a
    # copy cut short). Orbax fails on one array while it still reads the others.
    data = [f for f in (run / "checkpoints" / "6" / "opt").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert data, "the optimizer state's data files"
    for f in data:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    cut_short = run / "checkpoints" / "7.orbax-checkpoint-tmp-1765000000"  # a save two Ctrl-Cs interrupted
    cut_short.mkdir()
    (cut_short / "partial").write_text("")
    longer = load_config("tiny", FAST + ["train.steps=8", "train.checkpoint_every=3", "train.eval_every=1000"])
    train(longer, run, resume=True, progress=False)
    err = capfd.readouterr().err
    assert "checkpoint step 6" in err and "is damaged" in err and "damaged_checkpoints/6" in err, err
    assert err.count("is damaged") == 1 and "Event loop is closed" not in err and "Traceback" not in err, \
        f"the fallback says one line, without tracebacks:\n{err[:3000]}"
    assert not cut_short.exists(), "a temporary folder of an interrupted save is removed at the next start"
    assert (run / "damaged_checkpoints" / "6" / "opt").is_dir(), "the damaged checkpoint is kept, not deleted"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3", "6", "8"]
    assert sorted(_metrics(run)) == list(range(1, 9)), "steps 4-6 ran twice but are logged once"


def test_resume_of_a_workdir_without_checkpoints_is_refused(tmp_path):
    cfg = load_config("tiny", FAST + ["train.steps=2"])
    with pytest.raises(CheckpointError, match=r"--resume: .*typo.* holds no checkpoint to resume from .*drop --resume"):
        train(cfg, tmp_path / "typo", resume=True, progress=False)
    assert not (tmp_path / "typo").exists(), "nothing was created"


@pytest.mark.slow  # the default run stays near ten minutes: run with -m slow
def test_a_mixture_trains_and_logs_each_validation_set(tmp_path):
    from dsmoe_jax import prepare

    for name, text in (("prose", "the quick brown fox jumps over the lazy dog. "), ("code", "def f(x): return x\n")):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{i} " + text * 8}) + "\n"
                                                        for i in range(60)))
        prepare.prepare([str(tmp_path / f"{name}.jsonl")], tmp_path / name, workers=1, progress=False)
    prose, code = tmp_path / "prose", tmp_path / "code"
    mix = f"data.mix=[{{name='prose', path='{prose}', weight=3}}, {{name='code', path='{code}'}}]"
    # the other tests' shapes: their compiled programs are reused (conftest's compilation cache)
    cfg = load_config("tiny", FAST + [mix, "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"])
    last = train(cfg, tmp_path / "run", progress=False)
    m = _metrics(tmp_path / "run")[2]
    assert {"val_loss/prose", "val_loss/code", "val_loss_stderr/code"} <= set(m) and "val_loss/prose" not in _metrics(
        tmp_path / "run")[1]
    assert m["val_loss"] == pytest.approx(0.75 * m["val_loss/prose"] + 0.25 * m["val_loss/code"]), "weighted as drawn"
    assert (last.step, last.loss, last.val_loss) == (2, m["loss"], m["val_loss"]) and last.metrics == {
        k: v for k, v in m.items() if k != "step"}, "the last logged line, typed"


def test_a_second_signal_stops_at_once_with_one_line_and_no_traceback(monkeypatch, capsys):
    exits = []

    def exit_now(code):  # os._exit would end pytest too
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_now)
    with loop_lib._StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT and not exits, "the first signal only asks to finish the step"
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGINT)
    assert exits == [130], "128 + SIGINT, at once"
    err = capsys.readouterr().err
    assert err.count("SIGINT again: stopped at once, without a checkpoint") == 1 and "Traceback" not in err, err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handlers are restored"


def test_a_batch_that_does_not_split_is_a_config_error_with_exit_code_2(tmp_path, capsys):
    from dsmoe_jax import cli

    assert cli.main(["train", "--config", "tiny", "--set", "train.batch_size=6", "--set", "train.grad_accum=4",
                     "--workdir", str(tmp_path / "run")]) == 2, "README: exit code 2 for configuration errors"
    err = capsys.readouterr().err
    assert "config error: train.batch_size=6 must split into train.grad_accum=4 micro-batches" in err, err
    assert err.rstrip().endswith("choose a multiple of 4"), err
    assert not (tmp_path / "run").exists(), "refused before the workdir is created"


def test_a_step_that_outlives_the_timeout_names_the_checkpoint_and_exits(monkeypatch, capsys):
    """What a process of a multi-process run does when a peer stops answering (kill -STOP):
    its step waits in a collective; after train.step_timeout it says so and ends."""
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)  # the timer thread would end pytest too
    watchdog = loop_lib._StepWatchdog(0.2, lambda step: f"step {step} waited; resume from step 40")
    watchdog.arm(41)
    time.sleep(0.05)  # a step in time: nothing happens
    watchdog.disarm()
    time.sleep(0.3)
    assert not exits
    watchdog.arm(42)
    deadline = time.time() + 10
    while not exits and time.time() < deadline:
        time.sleep(0.05)
    assert exits == [TrainingError.exit_code], exits
    assert "dsmoe-jax: step 42 waited; resume from step 40" in capsys.readouterr().err
    unlimited = loop_lib._StepWatchdog(0, lambda step: pytest.fail("0 is no limit"))
    unlimited.arm(1)
    time.sleep(0.05)
    unlimited.disarm()
