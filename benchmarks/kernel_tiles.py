"""Registers, spills and shared memory of the Triton kernels at candidate tile configs, from
ahead-of-time compilation for Hopper (sm_90): no GPU needed. A kernel that spills registers to
local memory loses much of its speed, so this narrows the configs worth timing on a GPU
(``benchmarks/gpu_check.sh`` times the default one). Runs the PTX through ``ptxas -v``, which
Triton ships, for the registers and spill bytes of each kernel.

    python benchmarks/kernel_tiles.py
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import tempfile

CANDIDATES = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
    (64, 128, 64, 8, 3),
    (64, 128, 64, 4, 3),
    (64, 64, 64, 4, 3),
    (128, 128, 64, 8, 3),
    (64, 128, 32, 4, 4),
]


def resources(ptx: str, ptxas: pathlib.Path) -> dict:
    """Registers per thread and spill bytes (stores, loads) of the one kernel in ``ptx``."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        info = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {"registers": int(re.search(r"Used (\d+) registers", info).group(1)),
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    args = parser.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    from dsmoe_jax.kernels import backend as kb

    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    default = kb.blocks(interpret=False)
    print("| tiles M x N x K, warps, stages | kernel | registers | spill stores / loads (bytes) | shared KiB |")
    print("|---|---|---|---|---|")
    for m, n, k, warps, stages in CANDIDATES:
        tiles = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "num_warps": warps, "num_stages": stages}
        label = f"{m}x{n}x{k}, {warps}w, {stages}s" + (" (default)" if tiles == default else "")
        for name, compiled in kb.compile_for_hopper(tiles, args.dtype).items():
            r = resources(compiled.asm["ptx"], ptxas)
            print(f"| {label} | {name} | {r['registers']} | {r['spill_stores']} / {r['spill_loads']} | "
                  f"{compiled.metadata.shared / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
