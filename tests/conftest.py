"""Shared fixtures: small shapes, fixed seeds; a runner for multi-device subprocesses. Helpers
that several test modules import live in ``helpers.py``."""

import os
import pathlib
import subprocess
import sys

import jax
import pytest

from dsmoe_jax import ModelConfig, MoEConfig, grouped, runtime
from dsmoe_jax.kernels import backend as kernel_backend

TESTS = pathlib.Path(__file__).resolve().parent

# Triton's interpreter-or-compiler mode is process-wide and fixed when Triton is first imported;
# transformers imports it too. Fix it here, before any test runs, for the kernels' tests.
kernel_backend.kernels(kernel_backend.default_interpret())


@pytest.fixture
def small_cfg() -> ModelConfig:
    """A 3-block model (first dense) with 2 shared + 8 routed experts, top-3."""
    return ModelConfig(
        vocab_size=97, d_model=32, n_layers=3, n_heads=4, d_ff=64, first_k_dense=1, max_seq_len=64,
        init_std=0.05,
        moe=MoEConfig(n_routed_experts=8, n_shared_experts=2, top_k=3, expert_d_ff=16, aux_loss_alpha=0.01),
    )


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory):
    """Tokenized corpora and compiled XLA programs go to a per-session directory, not the user's
    cache; the compilation cache is shared with the tests' subprocesses (through the variables
    jax reads at start-up), so each program compiles once per session."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("cache")
    mp.setenv("DSMOE_JAX_CACHE", str(root))
    xla = runtime.enable_compilation_cache(root / "xla")
    mp.setenv("JAX_COMPILATION_CACHE_DIR", str(xla))
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    mp.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    # Triton's default cache folder may not be creatable (it was not on the GPU image).
    mp.setenv("TRITON_CACHE_DIR", str(root / "triton"))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _ieee_float32_matmuls_on_gpu():
    """XLA's default float32 matmul on a GPU is TF32 (about 1e-3 relative), so float32 results
    compared with float64 or numpy references at 1e-5 would fail for the reference's precision,
    not the code's: on a GPU every test computes float32 matmuls in full precision."""
    if jax.default_backend() == "gpu":
        with jax.default_matmul_precision("highest"):
            yield
    else:
        yield


@pytest.fixture
def registered_backend():
    """``register(name, fn)``: a grouped-MLP backend that exists for this test only."""
    names = []

    def register(name, fn):
        grouped.register_backend(name, fn)
        names.append(name)

    yield register
    for name in names:
        grouped.unregister_backend(name)


def run_python(script: str, *args: str, devices: int = 8, timeout: float = 600) -> str:
    """Run ``script`` in a fresh interpreter with ``devices`` fake CPU devices (the device count is
    fixed when jax starts), able to import ``helpers``; returns its stdout, failing the test with
    its stderr if it fails."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout
