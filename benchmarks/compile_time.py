"""Compile time of the train step against depth, blocks unrolled vs ``model.scan_layers``.

For each depth and layout, traces and lowers the jitted train step (AdamW, remat) of a narrow
model on abstract inputs (nothing is allocated or run) and compiles it, timing the two apart.
The persistent compilation cache is left off, so every number is a cold compile. Each row runs in
its own process, so no trace or compile cache of an earlier row helps a later one.

    python benchmarks/compile_time.py --layers 4 16 64
    python benchmarks/compile_time.py --layers 2 4 --d-model 64   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def measure(layers: int, scan: bool, d_model: int) -> dict:
    """Seconds to trace + lower and to compile the train step of a ``layers``-deep model."""
    import jax

    import dsmoe_jax
    from dsmoe_jax.train.optimizer import make_optimizer
    from dsmoe_jax.train.step import init_state, make_train_step

    cfg = dsmoe_jax.load_config("tiny", [f"model.n_layers={layers}", f"model.d_model={d_model}", "model.remat=true",
                                         f"model.scan_layers={str(scan).lower()}"])
    optimizer = make_optimizer(cfg.train)
    state = jax.eval_shape(lambda: init_state(dsmoe_jax.param_shapes(cfg), optimizer))
    windows = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.train.seq_len + 1), "int32")
    step = jax.jit(make_train_step(cfg, optimizer))
    t0 = time.perf_counter()
    lowered = step.lower(state, windows)
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"layers": layers, "scan_layers": scan, "d_model": d_model, "trace_lower_s": t1 - t0, "compile_s": t2 - t1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--row", help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args()
    if args.row:
        layers, scan = args.row.split(",")
        print("@@" + json.dumps(measure(int(layers), scan == "scan", args.d_model)))
        return
    rows = []
    for scan in (False, True):
        for layers in args.layers:
            out = subprocess.run([sys.executable, __file__, "--row", f"{layers},{'scan' if scan else 'unrolled'}",
                                  "--d-model", str(args.d_model)], capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(next(line[2:] for line in out.splitlines() if line.startswith("@@"))))
            r = rows[-1]
            kind = "scanned" if scan else "unrolled"
            print(f"{kind:>9} {layers:>3} layers: trace+lower {r['trace_lower_s']:6.2f} s, "
                  f"compile {r['compile_s']:6.2f} s", flush=True)
    print("\n| layers | unrolled: trace+lower / compile (s) | scanned: trace+lower / compile (s) |")
    print("|---|---|---|")
    by = {(r["layers"], r["scan_layers"]): r for r in rows}
    for layers in args.layers:
        cells = [f"{by[layers, s]['trace_lower_s']:.2f} / {by[layers, s]['compile_s']:.2f}" for s in (False, True)]
        print(f"| {layers} | {cells[0]} | {cells[1]} |")
    for scan in (False, True):
        first, last = by[args.layers[0], scan], by[args.layers[-1], scan]
        total = lambda r: r["trace_lower_s"] + r["compile_s"]
        print(f"{'scanned' if scan else 'unrolled'}: {args.layers[0]} -> {args.layers[-1]} layers, "
              f"trace+lower+compile grows {total(last) / total(first):.2f}x")


if __name__ == "__main__":
    main()
