"""Everything a GPU must show, in one time-boxed run: ``benchmarks/gpu_check.sh`` calls this.

Steps, each in its own process group with its own time box (the whole group is killed at the
box, so a step's own children never outlive it holding the GPU's memory), so that a failure or a
hang of one does not stop the others:

  profile      benchmarks/profile_step.py on the 2B config: jax.profiler traces of 3 training
               steps and 20 decode steps, summarised (top kernels, time per phase, host gaps)
  grouped_mlp  benchmarks/grouped_mlp.py at the 16B layer shapes: TFLOP/s of the triton backend,
               lax.ragged_dot and a dense GEMM chain of equal FLOPs, forward and forward+backward
  attention    causal attention at 4K tokens in bf16: cuDNN's flash kernel (the GPU default) against
               the masked and blocked paths, error against a float32 reference, time and memory
  train        training steps of the 2B config in bf16: tokens/s and model-FLOPs utilisation
               against the bf16 matmul peak measured in the same process
  decode       greedy decoding tokens/s at batch 1 and 64 for the same model, against the bound
               that HBM bandwidth (measured in the same process) puts on it
  vs_transformers  benchmarks/vs_transformers.py on the GPU: the same 2B weights in transformers'
               Qwen2MoeForCausalLM, training step and greedy decoding, ratios measured in this run
  tests        the tests marked ``gpu`` (kernels natively, model, MoE, attention, inference)
  fp8          model.fp8's FP8 GEMMs (emulated): the 2B training step with them (``train``: without)
               and the expert GEMMs, tiled_fp8 against tiled and a dense GEMM of equal FLOPs

Writes ``OUT/gpu_check.json``: the environment (versions, devices, nvidia-smi), and per step its
status (ok, failed, timeout), seconds, numbers and the end of its log. ``--dry-run`` runs the same
steps at toy sizes on whatever platform this is (the kernels under Triton's interpreter), so the
script is known to work before a GPU is ever available.

    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check_out
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Seconds per step on the GPU: 585 s in all, about 10 minutes with the installation. Sized from the
# first H200 run (2026-12-04): the 2B train step's first call took 15 s (compilation), the kernel
# tests 40-60 s, each grouped_mlp shape about 20 s with two backends (now four); the profile and
# the peer each compile a training step and a decode program and build the 2B model.
TIME_BOX = {"profile": 95, "grouped_mlp": 70, "attention": 45, "train": 60, "decode": 75, "vs_transformers": 100,
            "tests": 80, "fp8": 60}
DRY_TIME_BOX = {"profile": 90, "grouped_mlp": 60, "attention": 60, "train": 90, "decode": 90, "vs_transformers": 180,
                "tests": 240, "fp8": 180}
PACKAGES = ["jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore",
            "triton", "jax-triton", "torch", "transformers", "numpy"]
OWED = ["the expert-parallel exchange (ragged all_to_all between GPUs) needs at least two GPUs: not checked here"]


def _run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], check=True, cwd=ROOT)


def step_profile(dry: bool, out: pathlib.Path) -> dict:
    shape = (["--config", "tiny", "--set", "model.dtype=float32", "--batch", "2", "--seq", "64", "--prompt", "16"]
             if dry else ["--config", "2b", "--set", "model.dtype=bfloat16", "--batch", "8", "--seq", "2048"])
    path = out / "profile.partial.json"  # the training part survives a time-out of the decoding part
    _run("profile_step.py", *shape, "--train-steps", "3", "--new-tokens", "20", "--out", str(out / "profile"),
         "--json", str(path))
    return json.loads(path.read_text())


def step_grouped_mlp(dry: bool, out: pathlib.Path) -> dict:
    backends = ["triton", "ragged", "pallas_mgpu", "torch"]
    shape = (["--tokens", "64", "--d-model", "32", "--d-ff", "16", "--experts", "4", "--top-k", "2",
              "--dtype", "float32", "--backends", *backends, "tiled", "--reps", "1"] if dry else
             ["--tokens", "8192", "32768", "--backends", *backends, "--reps", "10"])
    path = out / "grouped_mlp.partial.json"  # written row by row: the rows measured survive a time-out
    _run("grouped_mlp.py", *shape, "--json", str(path))
    return {"rows": json.loads(path.read_text())}


def _model(dry: bool):
    import dsmoe_jax

    if dry:
        return dsmoe_jax.load_config("tiny", ["model.dtype=float32"]), 2, 64
    return dsmoe_jax.load_config("2b", ["model.dtype=bfloat16", "model.remat=true"]), 8, 2048


def _seconds(fn, reps: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compile and warm up
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / reps


def _matmul_peak(dry: bool) -> float:
    """FLOP/s of one large square matmul in the model's compute dtype."""
    import jax
    import jax.numpy as jnp

    n, dtype = (512, jnp.float32) if dry else (8192, jnp.bfloat16)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(lambda a: a @ a)
    return 2 * n**3 / _seconds(lambda: matmul(a), 3 if dry else 10)


def _copy_bandwidth(dry: bool) -> float:
    """Bytes/s read plus written by a device-to-device copy of 2 GiB (1 MiB in a dry run)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones(((1 << 18) if dry else (1 << 29),), jnp.float32)
    copy = jax.jit(lambda x: x + 1)
    return 2 * x.nbytes / _seconds(lambda: copy(x), 3 if dry else 20)


def step_attention(dry: bool, out: pathlib.Path) -> dict:
    import jax
    import jax.numpy as jnp

    from dsmoe_jax.attention import attention, causal_mask, resolve_implementation

    B, S, N, H, dtype = (2, 256, 4, 32, jnp.float32) if dry else (2, 4096, 16, 128, jnp.bfloat16)
    ks = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (B, S, N, H), dtype) for kk in ks)
    valid = jnp.ones((B, S), bool).at[0, : S // 8].set(False)  # a left-padded row, as pad_prompts makes
    real = valid[:, :, None, None]
    mask = causal_mask(valid, jnp.arange(S))
    flops = 2 * B * N * S * S * H  # QK^T and PV over the causal half; the backward does 2.5x that
    reference = jax.nn.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)), mask=mask)
    rows = {"auto_resolves_to": resolve_implementation("auto", dtype=dtype), "shape": [B, S, N, H],
            "dtype": str(jnp.dtype(dtype))}
    for name in ("cudnn", "xla", "blocked"):  # each compiled once: timing and memory from the same program
        fwd = jax.jit(lambda q, k, v, name=name: attention(q, k, v, valid, implementation=name))
        loss = lambda q, k, v, name=name: jnp.sum(jnp.where(real, attention(q, k, v, valid, implementation=name), 0)
                                                  .astype(jnp.float32) ** 2)
        fwd = fwd.lower(q, k, v).compile()
        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        error = jnp.max(jnp.abs(jnp.where(real, fwd(q, k, v).astype(jnp.float32) - reference, 0)))
        memory = fwd_bwd.memory_analysis()
        reps = 2 if dry else 10
        forward_s, both_s = _seconds(lambda: fwd(q, k, v), reps), _seconds(lambda: fwd_bwd(q, k, v), reps)
        rows[name] = {"max_abs_error_vs_f32": float(error), "forward_ms": 1e3 * forward_s,
                      "forward_backward_ms": 1e3 * both_s, "forward_tflops": flops / forward_s / 1e12,
                      "forward_backward_tflops": 3.5 * flops / both_s / 1e12,
                      "forward_backward_temp_mib": memory.temp_size_in_bytes / 2**20 if memory else None}
        (out / "attention.partial.json").write_text(json.dumps(rows, indent=1))  # survives a time-out
    rows["cudnn_vs_xla_forward_backward"] = rows["xla"]["forward_backward_ms"] / rows["cudnn"]["forward_backward_ms"]
    return rows


def step_train(dry: bool, out: pathlib.Path) -> dict:
    cfg, B, S = _model(dry)
    return _train_speed(cfg, B, S, dry)


def _train_speed(cfg, B: int, S: int, dry: bool) -> dict:
    """Training steps of ``cfg`` on ``B`` x ``S`` tokens: time, tokens/s, model-FLOPs utilisation."""
    import jax

    import dsmoe_jax
    from dsmoe_jax.attention import resolve_implementation
    from dsmoe_jax.costs import flops_per_token
    from dsmoe_jax.train.optimizer import make_optimizer
    from dsmoe_jax.train.step import init_state, make_train_step

    optimizer = make_optimizer(cfg.train)
    state = init_state(dsmoe_jax.init_params(cfg.model, jax.random.key(0)), optimizer)
    step = jax.jit(make_train_step(cfg, optimizer), donate_argnums=0)
    windows = jax.random.randint(jax.random.key(1), (B, S + 1), 0, cfg.model.vocab_size)
    t0 = time.perf_counter()
    state, metrics = step(state, windows)
    jax.block_until_ready(metrics.loss)
    compile_and_first = time.perf_counter() - t0
    reps = 2 if dry else 5
    t0 = time.perf_counter()
    for _ in range(reps):
        state, metrics = step(state, windows)
    loss = float(metrics.loss)
    seconds = (time.perf_counter() - t0) / reps
    tokens_s = B * S / seconds
    model_flops = 3 * flops_per_token(cfg.model, S) * tokens_s  # forward + backward
    peak = _matmul_peak(dry)
    attention = resolve_implementation(cfg.model.attention, dtype=cfg.model.dtype)
    return {"config": "tiny" if dry else "2b", "dtype": cfg.model.dtype, "attention": attention,
            "batch": [B, S], "loss": loss,
            "first_step_s": compile_and_first, "step_s": seconds, "tokens_per_s": tokens_s,
            "model_tflops": model_flops / 1e12, "matmul_peak_tflops": peak / 1e12, "mfu": model_flops / peak}


def step_fp8(dry: bool, out: pathlib.Path) -> dict:
    """model.fp8 (DeepSeek-V3's FP8 GEMMs, emulated: e4m3-rounded inputs in ordinary GEMMs): the
    2B training step with it (the ``train`` step is the same model without), then the expert
    GEMMs alone, tiled_fp8 against tiled at the 16B layer shapes, in this process."""
    import dataclasses

    cfg, B, S = _model(dry)
    rows = {"train": _train_speed(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fp8=True)), B, S, dry)}
    (out / "fp8.partial.json").write_text(json.dumps(rows, indent=1))  # survives a time-out
    shape = (["--tokens", "64", "--d-model", "32", "--d-ff", "16", "--experts", "4", "--top-k", "2",
              "--dtype", "float32", "--reps", "1"] if dry else ["--tokens", "8192", "--reps", "5"])
    path = out / "fp8_grouped.partial.json"
    _run("grouped_mlp.py", *shape, "--backends", "tiled", "tiled_fp8", "--json", str(path))
    rows["grouped_mlp"] = json.loads(path.read_text())
    return rows


def step_decode(dry: bool, out: pathlib.Path) -> dict:
    import functools

    import jax
    import jax.numpy as jnp

    import dsmoe_jax
    from dsmoe_jax import inference
    from dsmoe_jax.costs import count_params

    cfg, _, _ = _model(dry)
    m = cfg.model
    dtype = jnp.dtype(m.dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), dsmoe_jax.init_params(m, jax.random.key(0)))
    prompt, new = (16, 16) if dry else (128, 128)
    bandwidth = _copy_bandwidth(dry)
    total, activated = count_params(m)
    rows = {}
    for batch in (1, 64):
        ids = jax.random.randint(jax.random.key(2), (batch, prompt), 0, m.vocab_size)
        run = lambda n: jax.jit(functools.partial(inference.generate, cfg=m, max_new_tokens=n, temperature=0.0))
        gen_n, gen_1 = run(new), run(1)
        key = jax.random.key(0)
        per_token = (_seconds(lambda: gen_n(params, ids, rng=key), 2)
                     - _seconds(lambda: gen_1(params, ids, rng=key), 2)) / (new - 1)
        # A decode step reads at least the weights its tokens use (all of them once a batch
        # touches every expert) and the KV cache written so far.
        used = total if batch > 1 else activated
        cache = 2 * m.n_layers * batch * (prompt + new // 2) * m.kv_heads * m.head_dim * dtype.itemsize
        bound_s = (used * dtype.itemsize + cache) / bandwidth
        rows[f"batch_{batch}"] = {"tokens_per_s": batch / per_token, "step_ms": 1e3 * per_token,
                                  "hbm_bound_ms": 1e3 * bound_s, "fraction_of_bound": bound_s / per_token}
    return {"config": "tiny" if dry else "2b", "dtype": str(dtype), "prompt": prompt, "new": new,
            "copy_bandwidth_gbs": bandwidth / 1e9, "params": total, "activated": activated,
            **rows, "speculative": _speculative_pass(m, prompt + new // 2, dry)}


def _speculative_pass(m, filled: int, dry: bool) -> dict:
    """What a self-speculative step costs against a greedy one, batch 1: the model over two
    tokens plus the MTP depth (``forward_cached`` with ``mtp_cache``) against ``decode_step``, on a cache of
    ``filled`` tokens (random weights: the cost does not depend on them). With acceptance a, a
    step yields 1 + a tokens, so the speed-up is (1 + a) x step / pass."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    import dsmoe_jax
    from dsmoe_jax import inference, model

    m = dataclasses.replace(m, mtp_depth=1)
    dtype = jnp.dtype(m.dtype)
    params = jax.tree.map(lambda p: p.astype(dtype), dsmoe_jax.init_params(m, jax.random.key(0)))
    slots = filled + 8
    full = lambda c: c._replace(valid_BT=c.valid_BT.at[:, :filled].set(True), index=jnp.int32(filled))
    cache, mtp_cache = full(inference.init_cache(m, 1, slots)), full(inference.init_cache(m, 1, slots, mtp=True))
    step = jax.jit(lambda p, c: inference.decode_step(p, jnp.zeros((1,), jnp.int32), jnp.full((1,), filled), c, m))
    two = jnp.zeros((1, 2), jnp.int32)
    positions = jnp.asarray([[filled, filled + 1]])
    verify = jax.jit(lambda p, c, d: model.forward_cached(p, two, c, m, jnp.ones((1, 2), jnp.int32), positions,
                                                           mtp_cache=d))
    reps = 3 if dry else 20
    step_s = _seconds(lambda: step(params, cache), reps)
    pass_s = _seconds(lambda: verify(params, cache, mtp_cache), reps)
    return {"greedy_step_ms": 1e3 * step_s, "speculative_pass_ms": 1e3 * pass_s, "pass_over_step": pass_s / step_s,
            # tiny-v3 + MTP after 300 CPU steps accepts 84% of drafts along validation text (BENCHMARKS.md)
            "speedup_at_84pct_acceptance": 1.84 * step_s / pass_s}


def step_vs_transformers(dry: bool, out: pathlib.Path) -> dict:
    path = out / "vs_transformers.json"
    args = (["--models", "tiny", "--cells", "train,decode_b1", "--reps", "1"] if dry else
            ["--models", "2b", "--device", "gpu", "--cells", "train_2k,decode_b1,decode_b64", "--reps", "3"])
    _run("vs_transformers.py", *args, "--json", str(path))
    return {"results": json.loads(path.read_text())}


def step_tests(dry: bool, out: pathlib.Path) -> dict:
    # Under Triton's interpreter the kernel tests are slow: the dry run takes one group layout each.
    args = ["-m", "gpu", *(["-k", "not kernels or uneven_with_empty or compiles"] if dry else [])]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.returncode)
    return {"pytest_args": args}


STEPS = {"profile": step_profile, "grouped_mlp": step_grouped_mlp, "attention": step_attention, "train": step_train,
         "decode": step_decode, "vs_transformers": step_vs_transformers, "tests": step_tests, "fp8": step_fp8}


def _unmet_requirements() -> list[str]:
    """dsmoe-jax's dependencies whose installed version is outside its pins (installing with
    --no-deps keeps the image's versions, which may be older)."""
    from packaging.requirements import Requirement

    unmet = []
    for line in importlib.metadata.requires("dsmoe-jax") or []:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None or not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{req.name}{req.specifier}: {have or 'not installed'}")
    return unmet


def environment() -> dict:
    import jax

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        smi = f"nvidia-smi: {e}"
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(), "versions": versions, "unmet_requirements": _unmet_requirements(),
            "backend": jax.default_backend(),
            "devices": [d.device_kind for d in jax.devices()], "nvidia_smi": smi}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # the group is already gone
        pass


def run_boxed(cmd: list[str], box: float) -> tuple[str, str]:
    """Run ``cmd`` in its own process group for at most ``box`` seconds: its status (ok, failed,
    timeout) and its output. At the box, or when it ends, the whole group is killed: a step's own
    children (a benchmark it started) must not live on holding the GPU's memory for the next step.
    The output goes through a file, not a pipe, which such a child would hold open."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                start_new_session=True)
        try:
            proc.wait(timeout=box)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timeout after {box} s"
        finally:
            _kill_group(proc.pid)
            proc.wait()
        log.seek(0)
        return status, log.read()


def run_step(name: str, dry: bool, out: pathlib.Path) -> dict:
    """Run one step in a child process group under its time box; its numbers come back in a file."""
    box = (DRY_TIME_BOX if dry else TIME_BOX)[name]
    result = out / f"{name}.result.json"
    result.unlink(missing_ok=True)
    (out / f"{name}.partial.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    status, log = run_boxed([sys.executable, __file__, "--step", name, "--out", str(out),
                             *(["--dry-run"] if dry else [])], box)
    seconds = time.perf_counter() - t0
    # A step that did not finish may have left what it measured so far in NAME.partial.json.
    partial = out / f"{name}.partial.json"
    found = result if result.exists() else partial if partial.exists() else None
    numbers = json.loads(found.read_text()) if found else None
    result.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    with open(out / "gpu_check.log", "a") as f:
        f.write(f"\n===== {name}: {status}, {seconds:.1f} s =====\n{log}")
    return {"status": status, "seconds": round(seconds, 1), "numbers": numbers, "log_tail": log[-3000:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on this platform, kernels interpreted")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="where the results go")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, from {list(STEPS)}")
    parser.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)  # one step, in a child
    args = parser.parse_args()
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.step:
        numbers = STEPS[args.step](args.dry_run, out)  # every step: (dry, out folder) -> numbers
        (out / f"{args.step}.result.json").write_text(json.dumps(numbers, indent=1))
        return 0

    steps = args.steps.split(",")
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {list(STEPS)}")
    (out / "gpu_check.log").write_text("")
    # Triton's default cache folder could not be created on the GPU image: one in /tmp, for every step.
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton_cache_"))
    report = {"dry_run": args.dry_run, "environment": environment(), "owed": OWED, "steps": {}}
    path = out / "gpu_check.json"
    if not args.dry_run and report["environment"]["backend"] != "gpu":
        report["error"] = (f"JAX runs on {report['environment']['backend']!r}, not on the GPU: the image's CUDA "
                           "plugin did not load (was jax reinstalled beside it? install with --no-deps)")
        path.write_text(json.dumps(report, indent=1))
        print(report["error"], file=sys.stderr)
        return 1
    for name in steps:
        report["steps"][name] = run_step(name, args.dry_run, out)
        path.write_text(json.dumps(report, indent=1))  # what finished survives a later kill
        print(f"{name}: {report['steps'][name]['status']} ({report['steps'][name]['seconds']} s)", flush=True)
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
