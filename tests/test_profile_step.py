"""benchmarks/profile_step.py: kernels of a real CPU trace attributed to the model's phases by
their named scopes, and the per-step arithmetic of the summary."""

import importlib.util
import pathlib
import time

import jax
import jax.numpy as jnp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("profile_step", REPO / "benchmarks" / "profile_step.py")
profile_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_step)


@pytest.mark.parametrize("op_name, phase", [
    ("jit(step)/while/body/closed_call/transpose(jvp(experts))/while/body/dynamic_slice", "grouped_mlp"),
    ("jit(step)/while/body/closed_call/jvp(attention)/jvp(norm)/rsqrt", "norms"),  # innermost scope wins
    ("jit(generate)/while/body/router/top_k", "router"),
    ("jit(step)/optimizer/jit(clip)/max", "optimizer"),
    ("jit(step)/while/body/closed_call/jvp(shared_experts)/jit(silu)/mul", "dense_and_shared_mlp"),
    ("jit(step)/reduce_sum", "other"),
])
def test_a_kernel_belongs_to_the_innermost_known_scope(op_name, phase):
    assert profile_step.phase_of(op_name) == phase, op_name


def test_kernels_without_an_op_name_are_copies_or_unlabelled():
    assert profile_step.phase_of("", "copy.710") == "copies"
    assert profile_step.phase_of("", "fusion.3") == "unlabelled"


def test_op_names_read_from_hlo_text_also_for_fusions_that_lost_theirs():
    hlo = """HloModule jit_f, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation.2 (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %tanh.1 = f32[4]{0} tanh(%param_0), metadata={op_name="jit(f)/router/tanh"}
}

ENTRY %main.5 (x.1: f32[4]) -> f32[4] {
  %x.1 = f32[4]{0} parameter(0), metadata={op_name="x"}
  %sort.0 = f32[4]{0} sort(%x.1), dimensions={0}, metadata={op_name="jit(f)/dispatch/sort" stack_frame_id=4}
  ROOT %loop_fusion.2 = f32[4]{0} fusion(%sort.0), kind=kLoop, calls=%fused_computation.2
}
"""
    names = profile_step.op_names(hlo)
    assert names["sort.0"] == names["sort_0"] == "jit(f)/dispatch/sort", names
    assert names["loop_fusion.2"] == "jit(f)/router/tanh", "a fusion without metadata takes its body's"


def test_a_traced_program_is_summarised_by_phase(tmp_path):
    def program(x, w):  # sorts: XLA fuses them with nothing, so each scope keeps a kernel of its own
        with jax.named_scope("attention"):
            a = jnp.sort(x @ w, axis=0)
        with jax.named_scope("experts"):
            b = jnp.sort(a @ w, axis=1)
        return jnp.sum(b * b)  # outside every scope: "other"

    x, w = jnp.ones((256, 256)), jnp.full((256, 256), 0.01)
    compiled = jax.jit(program).lower(x, w).compile()
    compiled(x, w).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        t0 = time.perf_counter()
        for _ in range(3):
            compiled(x, w).block_until_ready()
        wall = time.perf_counter() - t0
    summary = profile_step.summarize(tmp_path, compiled.as_text(), 3, wall)
    phases = summary["phases_ms_per_step"]
    assert summary["module"] == "jit_program" and summary["kernels_traced"] > 0, summary
    assert {"attention", "grouped_mlp"} <= set(phases), phases
    assert 0 < summary["busy_ms_per_step"] <= summary["wall_ms_per_step"], summary
    assert summary["host_gap_ms_per_step"] >= 0, summary
    assert sum(phases.values()) == pytest.approx(summary["kernel_ms_per_step"], rel=1e-3), summary
    top = summary["top_kernels"]
    assert top and all(k["ms_per_step"] >= top[-1]["ms_per_step"] for k in top), top
    matmuls = [k for k in top if k["phase"] in ("attention", "grouped_mlp")]
    assert all(k["op_name"].startswith("jit(program)/") for k in matmuls), matmuls
