"""Where the time goes: ``jax.profiler`` traces of training steps and of greedy decoding,
summarised with ``jax.profiler.ProfileData`` into a small JSON.

For each program: the kernels with the most time (with the HLO op and the model's named scope
each came from), the time per phase of the model, and the gap between the step's wall time and
the time some kernel was running: the GPU waiting for the host. Phases come from the
``jax.named_scope`` labels of the model code (``attention``, ``router``, ``dispatch``,
``experts``, ``combine``, ``shared_experts``, ``norm``, ``lm_head``, ``loss``, ``optimizer``...),
read from each kernel's HLO ``op_name`` metadata in the compiled program.

CPU-sized (seconds), then the 2B config on a GPU (the GPU check's ``profile`` step):

    python benchmarks/profile_step.py --config tiny --batch 2 --seq 64 --out /tmp/profile
    python benchmarks/profile_step.py --config 2b --batch 8 --seq 2048 --out profile_out

On a CPU, kernels are the XLA:CPU thunks on the host's threads (they can overlap and nest, so
phase sums are approximate there); on a GPU, the kernels on the device's streams.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import pathlib
import re
import tempfile
import time

import jax

import dsmoe_jax
from dsmoe_jax import inference
from dsmoe_jax.train.optimizer import make_optimizer
from dsmoe_jax.train.step import init_state, make_train_step

# Named scope of the model code -> the phase it is reported under. The innermost scope of a
# kernel's op_name that appears here decides (MLA's norms count as attention, for example).
SCOPE_PHASES = {
    "attention": "attention",
    "router": "router",
    "dispatch": "dispatch",
    "combine": "dispatch",
    "exchange": "expert_exchange",
    "return": "expert_exchange",
    "experts": "grouped_mlp",
    "dense_mlp": "dense_and_shared_mlp",
    "shared_experts": "dense_and_shared_mlp",
    "norm": "norms",
    "embed": "embedding",
    "lm_head": "lm_head_and_loss",
    "loss": "lm_head_and_loss",
    "optimizer": "optimizer",
}
TOP_KERNELS = 25
# XLA:CPU traces a loop or call as one event enclosing its body's events: counted once, inside.
_CONTAINER = re.compile(r"^(while|conditional|call)(\.\d+)?$")
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s')
_COMPUTATION = re.compile(r'^\s*(?:ENTRY\s+)?%?([^\s(]+).*\{\s*$')
_OP_NAME = re.compile(r'metadata=\{[^}]*?op_name="([^"]*)"')
_CALLS = re.compile(r'calls=%?([^\s,]+)')


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its ``op_name`` metadata (the JAX name stack), from a compiled
    program's text; also under the kernel-style spelling (``fusion.3`` -> ``fusion_3``). A fusion
    that lost its own metadata to XLA's rewrites takes the first op_name inside it."""
    names, inside, calls, computation = {}, {}, {}, ""
    for line in hlo_text.splitlines():
        instruction, head = _INSTRUCTION.match(line), _COMPUTATION.match(line)
        if head and not instruction:
            computation = head.group(1)
            continue
        if not instruction:
            continue
        op_name, called = _OP_NAME.search(line), _CALLS.search(line)
        if op_name:
            names[instruction.group(1)] = op_name.group(1)
            inside.setdefault(computation, op_name.group(1))
        elif called:
            calls[instruction.group(1)] = called.group(1)
    for instruction, computation in calls.items():
        if computation in inside:
            names[instruction] = inside[computation]
    return {**names, **{re.sub(r"[.\-]", "_", k): v for k, v in names.items()}}


def phase_of(op_name: str, hlo_op: str = "") -> str:
    """The phase of a kernel from its op_name, e.g. ``jit(step)/transpose(jvp(experts))/dot``
    -> ``grouped_mlp``; ``copies`` for the copies XLA adds itself (no op_name: loop state,
    layout changes); ``unlabelled`` for other kernels without one; ``other`` when no known scope
    encloses it (residual adds, gradient accumulation)."""
    if not op_name:
        return "copies" if hlo_op.startswith("copy") else "unlabelled"
    for component in reversed(op_name.split("/")):
        for word in reversed(re.findall(r"[\w.\-]+", component)):  # transpose(jvp(x)): innermost first
            if word in SCOPE_PHASES:
                return SCOPE_PHASES[word]
    return "other"


Kernel = collections.namedtuple("Kernel", "name hlo_op module start_ns duration_ns")


def kernel_events(trace_dir: pathlib.Path) -> tuple[list[Kernel], dict[str, list[str]]]:
    """Every kernel of the newest trace under ``trace_dir``, and the planes and lines read (for
    checking the summary against the raw trace): the device streams' kernels on a GPU, the
    XLA:CPU thunks on the host otherwise."""
    paths = sorted(trace_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb trace under {trace_dir}")
    profile = jax.profiler.ProfileData.from_file(str(paths[-1]))
    planes = list(profile.planes)
    devices = [p for p in planes if p.name.startswith("/device:GPU")]
    kernels, seen = [], {}
    for plane in devices or [p for p in planes if p.name.startswith("/host:CPU")]:
        lines = list(plane.lines)
        seen[plane.name] = [line.name for line in lines]
        if devices:  # CUPTI's kernels are on the stream lines; other lines are derived from them
            lines = [line for line in lines if line.name.startswith("Stream")] or lines
        for line in lines:
            for event in line.events:
                stats = dict(event.stats)
                if devices or ("hlo_op" in stats and not _CONTAINER.match(str(stats["hlo_op"]))):
                    kernels.append(Kernel(event.name, str(stats.get("hlo_op", "")), str(stats.get("hlo_module", "")),
                                          event.start_ns, event.duration_ns))
    return kernels, seen


def _busy_ns(kernels: list[Kernel]) -> float:
    """Time at least one kernel was running: the union of their intervals."""
    busy, end = 0.0, float("-inf")
    for k in sorted(kernels, key=lambda k: k.start_ns):
        start, stop = max(k.start_ns, end), k.start_ns + k.duration_ns
        if stop > start:
            busy += stop - start
        end = max(end, stop)
    return busy


def summarize(trace_dir: pathlib.Path, hlo_text: str, steps: int, wall_s: float) -> dict:
    """The summary of ``steps`` runs of the compiled program ``hlo_text`` traced into
    ``trace_dir`` over ``wall_s`` seconds: per step, kernel time by phase and by kernel, and
    the host gap (wall time minus the time any kernel ran)."""
    module = hlo_text.split(None, 2)[1].rstrip(",") if hlo_text.startswith("HloModule") else ""
    kernels, seen = kernel_events(trace_dir)
    ours = [k for k in kernels if k.module == module]
    kernels = ours or kernels  # GPU events may not name their module: then every kernel counts
    names = op_names(hlo_text)
    by_kernel = collections.defaultdict(lambda: [0.0, 0])
    phases = collections.Counter()
    for k in kernels:
        op_name = names.get(k.hlo_op) or names.get(k.name, "")
        phases[phase_of(op_name, k.hlo_op)] += k.duration_ns
        entry = by_kernel[(k.name, k.hlo_op, op_name)]
        entry[0] += k.duration_ns
        entry[1] += 1
    kernel_ns = sum(phases.values())
    ms = lambda ns: round(ns / 1e6 / steps, 4)
    top = sorted(by_kernel.items(), key=lambda item: -item[1][0])[:TOP_KERNELS]
    busy_ns = _busy_ns(kernels)
    return {
        "module": module, "steps": steps, "kernels_traced": len(kernels), "planes": seen,
        "wall_ms_per_step": round(1e3 * wall_s / steps, 4),
        "kernel_ms_per_step": ms(kernel_ns),
        "busy_ms_per_step": ms(busy_ns),
        "host_gap_ms_per_step": round(1e3 * wall_s / steps - busy_ns / 1e6 / steps, 4),
        "phases_ms_per_step": {phase: ms(ns) for phase, ns in phases.most_common()},
        "top_kernels": [{"kernel": name, "hlo_op": hlo_op, "phase": phase_of(op_name, hlo_op), "op_name": op_name,
                         "ms_per_step": ms(ns), "calls_per_step": calls / steps,
                         "share": round(ns / max(kernel_ns, 1), 4)}
                        for (name, hlo_op, op_name), (ns, calls) in top],
    }


def _traced(compiled, args: tuple, steps: int, trace_dir: pathlib.Path, carry: bool) -> float:
    """Run ``compiled`` once untraced (warm-up), then ``steps`` times under the profiler; with
    ``carry`` the first output is the next call's first argument (a train state). Returns the
    traced wall time."""
    out = compiled(*args)
    jax.block_until_ready(out)
    with jax.profiler.trace(str(trace_dir)):
        t0 = time.perf_counter()
        for _ in range(steps):
            if carry:
                args = (out[0], *args[1:])
            out = compiled(*args)
        jax.block_until_ready(out)
        wall = time.perf_counter() - t0
    return wall


def profile_train(cfg, batch: int, seq: int, steps: int, trace_dir: pathlib.Path) -> dict:
    """Trace ``steps`` training steps of ``cfg`` at ``batch`` x ``seq`` tokens."""
    optimizer = make_optimizer(cfg.train)
    state = init_state(dsmoe_jax.init_params(cfg.model, jax.random.key(0)), optimizer)
    windows = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.model.vocab_size)
    compiled = jax.jit(make_train_step(cfg, optimizer), donate_argnums=0).lower(state, windows).compile()
    wall = _traced(compiled, (state, windows), steps, trace_dir, carry=True)
    return {"batch": [batch, seq], **summarize(trace_dir, compiled.as_text(), steps, wall)}


def profile_decode(cfg, batch: int, prompt: int, new: int, trace_dir: pathlib.Path) -> dict:
    """Trace one greedy ``generate`` of ``new`` tokens after a ``prompt``-token prompt, in the
    model's compute dtype."""
    m = cfg.model
    params = jax.tree.map(lambda p: p.astype(m.dtype), dsmoe_jax.init_params(m, jax.random.key(0)))
    ids = jax.random.randint(jax.random.key(2), (batch, prompt), 0, m.vocab_size)
    generate = jax.jit(functools.partial(inference.generate, cfg=m, max_new_tokens=new, temperature=0.0))
    compiled = generate.lower(params, ids, rng=jax.random.key(0)).compile()
    call = lambda params, ids: compiled(params, ids, rng=jax.random.key(0))
    wall = _traced(call, (params, ids), 1, trace_dir, carry=False)
    # One generate call traced; "per step" is per new token, with the prefill's share spread over them.
    return {"batch": batch, "prompt": prompt, **summarize(trace_dir, compiled.as_text(), new, wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="a shipped config name or a TOML path")
    parser.add_argument("--set", action="append", default=[], help="config overrides, section.key=value")
    parser.add_argument("--batch", type=int, default=2, help="training batch (sequences)")
    parser.add_argument("--seq", type=int, default=64, help="training sequence length")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--decode-batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--out", required=True, help="folder for the raw traces (removed at the end)")
    parser.add_argument("--json", help="where the summary goes (default OUT/profile.json)")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = pathlib.Path(args.json or out / "profile.json")
    cfg = dsmoe_jax.load_config(args.config, args.set)
    report = {"config": args.config, "overrides": args.set, "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "dtype": cfg.model.dtype}
    with tempfile.TemporaryDirectory(dir=out) as train_dir, tempfile.TemporaryDirectory(dir=out) as decode_dir:
        report["train"] = profile_train(cfg, args.batch, args.seq, args.train_steps, pathlib.Path(train_dir))
        summary.write_text(json.dumps(report, indent=1))  # the training part survives a time-out
        prompt = min(args.prompt, cfg.model.max_seq_len - args.new_tokens)
        report["decode"] = profile_decode(cfg, args.decode_batch, prompt, args.new_tokens, pathlib.Path(decode_dir))
    summary.write_text(json.dumps(report, indent=1))
    for name in ("train", "decode"):
        part = report[name]
        print(f"{name}: wall {part['wall_ms_per_step']} ms/step, kernels busy {part['busy_ms_per_step']}, "
              f"host gap {part['host_gap_ms_per_step']}; phases (ms/step) {part['phases_ms_per_step']}")


if __name__ == "__main__":
    main()
