"""Everything a GPU must show, in one time-boxed run: ``benchmarks/gpu_check.sh`` calls this.

Steps, each in its own process with its own time box, so that a failure or a hang of one does
not stop the others:

  kernels      tests/test_kernels.py on the GPU, natively (values and gradients vs jnp, bf16/fp32)
  grouped_mlp  benchmarks/grouped_mlp.py at the 16B layer shapes: TFLOP/s of the triton backend,
               lax.ragged_dot and a dense GEMM chain of equal FLOPs, forward and forward+backward
  attention    causal attention at 4K tokens in bf16: cuDNN's flash kernel (the GPU default) against
               the masked and blocked paths, error against a float32 reference, time and memory
  train        training steps of the 2B config in bf16: tokens/s and model-FLOPs utilisation
               against the bf16 matmul peak measured in the same process
  decode       greedy decoding tokens/s at batch 1 and 64 for the same model, against the bound
               that HBM bandwidth (measured in the same process) puts on it
  tests        the whole test suite on the GPU

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
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Seconds per step on the GPU (about 8 minutes in all, installation included) and in a dry run.
TIME_BOX = {"kernels": 75, "grouped_mlp": 75, "attention": 45, "train": 100, "decode": 75, "tests": 95}
DRY_TIME_BOX = {"kernels": 120, "grouped_mlp": 60, "attention": 60, "train": 90, "decode": 90, "tests": 60}
PACKAGES = ["jax", "jaxlib", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint", "grain", "tensorstore",
            "triton", "jax-triton", "torch", "transformers", "numpy"]
OWED = ["the expert-parallel exchange (ragged all_to_all between GPUs) needs at least two GPUs: not checked here"]


def _pytest(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.returncode)
    return {"pytest_args": args}


def step_kernels(dry: bool, out: pathlib.Path) -> dict:
    # The dry run keeps the interpreter's share small: one group layout per kernel test.
    return _pytest(["tests/test_kernels.py", *(["-k", "uneven_with_empty or compiles"] if dry else [])])


def step_grouped_mlp(dry: bool, out: pathlib.Path) -> dict:
    shape = (["--tokens", "64", "--d-model", "32", "--d-ff", "16", "--experts", "4", "--top-k", "2",
              "--dtype", "float32", "--backends", "triton", "ragged", "tiled", "--reps", "1"] if dry else
             ["--tokens", "8192", "32768", "--backends", "triton", "ragged", "--reps", "10"])
    path = out / "grouped_mlp.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grouped_mlp.py"), *shape, "--json", str(path)],
                   check=True, cwd=ROOT)
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
    reference = jax.nn.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)), mask=mask)
    rows = {"auto_resolves_to": resolve_implementation("auto", dtype=dtype), "shape": [B, S, N, H],
            "dtype": str(jnp.dtype(dtype))}
    for name in ("cudnn", "xla", "blocked"):
        fwd = jax.jit(lambda q, k, v, name=name: attention(q, k, v, valid, implementation=name))
        loss = lambda q, k, v, name=name: jnp.sum(jnp.where(real, attention(q, k, v, valid, implementation=name), 0)
                                                  .astype(jnp.float32) ** 2)
        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        error = jnp.max(jnp.abs(jnp.where(real, fwd(q, k, v).astype(jnp.float32) - reference, 0)))
        memory = fwd_bwd.lower(q, k, v).compile().memory_analysis()
        reps = 2 if dry else 10
        rows[name] = {"max_abs_error_vs_f32": float(error),
                      "forward_ms": 1e3 * _seconds(lambda: fwd(q, k, v), reps),
                      "forward_backward_ms": 1e3 * _seconds(lambda: fwd_bwd(q, k, v), reps),
                      "forward_backward_temp_mib": memory.temp_size_in_bytes / 2**20 if memory else None}
    return rows


def step_train(dry: bool, out: pathlib.Path) -> dict:
    import jax

    import dsmoe_jax
    from dsmoe_jax.attention import resolve_implementation
    from dsmoe_jax.model import flops_per_token
    from dsmoe_jax.train.optimizer import make_optimizer
    from dsmoe_jax.train.step import init_state, make_train_step

    cfg, B, S = _model(dry)
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


def step_decode(dry: bool, out: pathlib.Path) -> dict:
    import functools

    import jax
    import jax.numpy as jnp

    import dsmoe_jax
    from dsmoe_jax import inference
    from dsmoe_jax.model import count_params

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
            **rows}


def step_tests(dry: bool, out: pathlib.Path) -> dict:
    return _pytest(["tests/test_config.py"] if dry else ["-x"])


STEPS = {"kernels": step_kernels, "grouped_mlp": step_grouped_mlp, "attention": step_attention, "train": step_train,
         "decode": step_decode, "tests": step_tests}


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
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "versions": versions, "backend": jax.default_backend(),
            "devices": [d.device_kind for d in jax.devices()], "nvidia_smi": smi}


def run_step(name: str, dry: bool, out: pathlib.Path) -> dict:
    """Run one step in a child process under its time box; its numbers come back in a file."""
    box = (DRY_TIME_BOX if dry else TIME_BOX)[name]
    result = out / f"{name}.result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--step", name, "--out", str(out), *(["--dry-run"] if dry else [])]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=box, cwd=ROOT)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timeout after {box} s"
        log = "".join(s.decode() if isinstance(s, bytes) else (s or "") for s in (e.stdout, e.stderr))
    seconds = time.perf_counter() - t0
    numbers = json.loads(result.read_text()) if result.exists() else None
    result.unlink(missing_ok=True)
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
