"""dsmoe-jax vs Hugging Face transformers on the same weights, side by side (CPU float32, or GPU bf16).

The peer is transformers' ``Qwen2MoeForCausalLM`` (its default MoE path, grouped_mm experts, and
SDPA attention) holding exactly our weights through the mapping the conversion tests use: a dense
first layer via ``mlp_only_layers``, zero q/k/v biases, the shared-expert gate fixed at
sigmoid(0) = 0.5 with the shared down projection doubled. Each side runs in its own process (one
at a time, so they never share the cores), repetitions interleaved; parity (logits and greedy
tokens) is checked before anything is timed. Both sides make the same weights from one seed.

On a GPU (``--device gpu``) both sides compute in bfloat16 as their users would: our model with
``model.dtype = "bfloat16"`` (float32 master weights, remat) and bfloat16 weights for decoding;
transformers with float32 weights under ``torch.autocast`` for training (fused AdamW) and a
bfloat16 copy of the model for ``generate``. Parity is then checked in float32 (full-precision
matmuls on both sides) on the logits; greedy agreement in bfloat16 is reported, not required.
Cells:

  decode_b1, decode_b8  greedy decoding after a 32-token prompt: seconds per new token, from
                        generate(64 new) - generate(1 new) on each side (our ``generate``, HF's
                        ``model.generate``)
  prefill               one forward over 8 x 512 tokens that fills the KV cache
  train, train_2k       one training step on 8 x 256 (8 x 2048) tokens: forward, backward
                        (cross-entropy plus the balance loss), global-norm clipping, AdamW
  decode_b64            as decode_b1 at batch 64

Prints a markdown table of speed ratios (transformers time / dsmoe-jax time: above 1 we are
faster), min and median over the repetitions, and writes every timing to ``--json``.

    python benchmarks/vs_transformers.py --models tiny --reps 3
    python benchmarks/vs_transformers.py --models tiny,85m --reps 7 --json vs_transformers.json
    python benchmarks/vs_transformers.py --device gpu --models 2b --cells train_2k,decode_b1,decode_b64 --reps 3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Our configs, as (shipped config, overrides): the tiny one, an ~85M-parameter model (2 shared +
# 32 routed experts of width 256, top-4) and the paper's 2B (for a GPU).
MODELS = {
    "tiny": ("tiny", []),
    "85m": ("tiny", ["model.vocab_size=8192", "model.d_model=512", "model.n_layers=6", "model.n_heads=8",
                     "model.head_dim=64", "model.d_ff=2048", "moe.n_routed_experts=32", "moe.n_shared_experts=2",
                     "moe.top_k=4", "moe.expert_d_ff=256"]),
    "2b": ("2b", []),
}
CELLS = {
    "decode_b1": {"batch": 1, "prompt": 32, "new": 64},
    "decode_b8": {"batch": 8, "prompt": 32, "new": 64},
    "decode_b64": {"batch": 64, "prompt": 32, "new": 64},
    "prefill": {"batch": 8, "seq": 512},
    "train": {"batch": 8, "seq": 256},
    "train_2k": {"batch": 8, "seq": 2048},
}
# Each device's compute dtype, and our settings for it.
DEVICES = {"cpu": ("float32", ["model.dtype=float32"]),
           "gpu": ("bfloat16", ["model.dtype=bfloat16", "model.remat=true"])}
REPLY = "@@"  # marks the workers' replies on stdout; anything else there is library chatter


def load_config(name: str, device: str = "cpu", extra: tuple[str, ...] = ()):
    import dsmoe_jax

    base, overrides = MODELS[name]
    return dsmoe_jax.load_config(base, [*overrides, *DEVICES[device][1], *extra])


def model_config(name: str, device: str = "cpu"):
    return load_config(name, device).model


def weights(name: str) -> dict:
    """The HF tensors both sides load: random at the config's init std, the same for every call."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import random_hf_checkpoint

    cfg = model_config(name)
    return random_hf_checkpoint(cfg, std=cfg.init_std)


def tokens(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


def seconds(fn) -> float:
    """Wall seconds of ``fn``, which must wait for its own results."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_seconds(greedy, ids: np.ndarray, new: int) -> float:
    """Seconds per decoded token: generating ``new`` tokens minus generating one (the prefill)."""
    return (seconds(lambda: greedy(ids, new)) - seconds(lambda: greedy(ids, 1))) / (new - 1)


# ---- the two sides: each builds its model from the same HF tensors and times one cell --------


class Jax:
    def __init__(self, model: str, device: str, weights: dict):
        import dataclasses

        import jax
        import jax.numpy as jnp

        from dsmoe_jax import convert, inference

        self.jax, self.jnp, self.inference = jax, jnp, inference
        self.model, self.device = model, device
        self.cfg = cfg = model_config(model, device)
        self.params = jax.tree.map(jnp.asarray, convert.params_from_hf(weights.__getitem__, weights.__contains__, cfg))
        self.infer_params = jax.tree.map(lambda p: p.astype(cfg.dtype), self.params)
        self.f32_cfg = dataclasses.replace(cfg, dtype="float32")
        self.trainers = {}
        self.prefill = jax.jit(inference.prefill, static_argnames="cfg")
        self.generate = jax.jit(inference.generate, static_argnames=("cfg", "max_new_tokens", "temperature"))

    def logits(self, ids: np.ndarray) -> np.ndarray:
        from dsmoe_jax import forward

        with self.jax.default_matmul_precision("highest"):  # not TF32 on a GPU: parity is checked in float32
            return np.asarray(forward(self.params, self.jnp.asarray(ids), self.f32_cfg)[0])

    def greedy(self, ids: np.ndarray, new: int) -> np.ndarray:
        out = self.generate(self.infer_params, self.jnp.asarray(ids), cfg=self.cfg, max_new_tokens=new,
                            rng=self.jax.random.key(0), temperature=0.0)
        return np.asarray(self.jax.block_until_ready(out))

    def trainer(self, cell: str):
        """The jitted train step of ``cell``'s batch shape and its state (built on first use)."""
        if cell not in self.trainers:
            from dsmoe_jax.train.optimizer import make_optimizer
            from dsmoe_jax.train.step import init_state, make_train_step

            c = CELLS[cell]
            cfg = load_config(self.model, self.device, (f"train.batch_size={c['batch']}", f"train.seq_len={c['seq']}"))
            optimizer = make_optimizer(cfg.train)
            step = self.jax.jit(make_train_step(cfg, optimizer), donate_argnums=0)
            self.trainers[cell] = [step, init_state(self.jax.tree.map(self.jnp.copy, self.params), optimizer)]
        return self.trainers[cell]

    def run(self, cell: str) -> float:
        c, block = CELLS[cell], self.jax.block_until_ready
        if cell.startswith("train"):
            trainer = self.trainer(cell)
            windows = self.jnp.asarray(tokens(self.cfg.vocab_size, c["batch"], c["seq"] + 1))

            def step():
                trainer[1], metrics = trainer[0](trainer[1], windows)  # the state is donated
                block(metrics.loss)

            return seconds(step)
        if cell == "prefill":
            ids = self.jnp.asarray(tokens(self.cfg.vocab_size, c["batch"], c["seq"]))
            cache = self.inference.init_cache(self.cfg, c["batch"], c["seq"])
            return seconds(lambda: block(self.prefill(self.infer_params, ids, cache, cfg=self.cfg)))
        return decode_seconds(self.greedy, tokens(self.cfg.vocab_size, c["batch"], c["prompt"]), c["new"])


class Torch:
    def __init__(self, model: str, device: str, weights: dict):
        import torch

        sys.path.insert(0, str(ROOT / "tests"))
        from dsmoe_jax import convert
        from helpers import qwen2moe_oracle

        self.torch, self.cfg = torch, model_config(model)
        self.gpu = device == "gpu"
        self.device = "cuda" if self.gpu else "cpu"
        self.model = qwen2moe_oracle(weights, convert.config_to_hf(self.cfg)).to(self.device)
        self.model.config._attn_implementation = "sdpa"  # the oracle uses eager attention for exactness
        self.model.config.output_router_logits = True
        self.model.config.router_aux_loss_coef = self.cfg.moe.aux_loss_alpha
        # Decoding in the compute dtype: on a GPU a bfloat16 copy (float32 weights stay for training).
        self.infer = copy.deepcopy(self.model).to(torch.bfloat16) if self.gpu else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1,
                                           **({"fused": True} if self.gpu else {"foreach": True}))

    def _wait(self):
        if self.gpu:
            self.torch.cuda.synchronize()

    def _ids(self, ids: np.ndarray):
        return self.torch.from_numpy(ids).long().to(self.device)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self._ids(ids)).logits.float().cpu().numpy()

    def greedy(self, ids: np.ndarray, new: int) -> np.ndarray:
        with self.torch.inference_mode():
            ids_t = self._ids(ids)
            out = self.infer.generate(ids_t, attention_mask=self.torch.ones_like(ids_t), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
            self._wait()
        return out[:, ids.shape[1]:].cpu().numpy()

    def run(self, cell: str) -> float:
        torch, c = self.torch, CELLS[cell]
        if cell.startswith("train"):
            windows = self._ids(tokens(self.cfg.vocab_size, c["batch"], c["seq"] + 1))
            self.model.train()

            def step():
                with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.gpu):
                    out = self.model(windows[:, :-1])
                    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), windows[:, 1:].flatten())
                (ce + self.model.config.router_aux_loss_coef * out.aux_loss).backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self._wait()

            t = seconds(step)
            self.model.eval()
            return t
        if cell == "prefill":
            ids = self._ids(tokens(self.cfg.vocab_size, c["batch"], c["seq"]))

            def prefill():
                with torch.inference_mode():
                    self.infer(ids, use_cache=True)
                self._wait()

            return seconds(prefill)
        return decode_seconds(self.greedy, tokens(self.cfg.vocab_size, c["batch"], c["prompt"]), c["new"])


def worker(side: str, model: str, device: str) -> None:
    """Serve requests from the parent on stdin, one JSON object per line."""
    impl = {"jax": Jax, "torch": Torch}[side](model, device, weights(model))
    reply = lambda obj: print(REPLY, json.dumps(obj), flush=True)
    reply({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "parity":
            ids = np.load(req["ids"])
            np.save(req["out"], impl.logits(ids))
            reply({"greedy": impl.greedy(ids[:, :8], 16).tolist()})
        elif req["op"] == "run":
            reply({"seconds": impl.run(req["cell"])})


# ---- the parent: start both sides, check parity, interleave the timings -------------------


class Worker:
    """One side in its own process; call ``read()`` once for its ready message (the two sides
    build their models at the same time)."""

    def __init__(self, side: str, model: str, device: str):
        self.side = side
        env = dict(os.environ)
        if device == "gpu":  # both sides share the GPU: JAX would otherwise take 75% of its memory at start
            env.update(XLA_PYTHON_CLIENT_PREALLOCATE="true", XLA_PYTHON_CLIENT_MEM_FRACTION="0.45")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", side, "--models", model,
                                      "--device", device], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        raise RuntimeError(f"the {self.side} worker exited with code {self.proc.wait()}")

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def check_parity(workers: dict, vocab: int, tmp: pathlib.Path, device: str) -> dict:
    """Float32 logits equal to 1e-4 of their scale; greedy tokens equal in float32 (on a GPU, in
    bfloat16, where near-ties may differ: their agreement is reported)."""
    ids_path = tmp / "ids.npy"
    np.save(ids_path, tokens(vocab, 2, 64, seed=1))
    logits, greedy = {}, {}
    for side, w in workers.items():
        greedy[side] = np.array(w.ask(op="parity", ids=str(ids_path), out=str(tmp / f"{side}.npy"))["greedy"])
        logits[side] = np.load(tmp / f"{side}.npy")
    diff = float(np.max(np.abs(logits["jax"] - logits["torch"])))
    scale = max(1.0, float(np.max(np.abs(logits["torch"]))))
    agree = float(np.mean(greedy["jax"] == greedy["torch"]))
    if diff > 1e-4 * scale or (device == "cpu" and agree < 1):
        raise SystemExit(f"parity failed: max |logits difference| {diff:.2e} (logits up to {scale:.1f}), "
                         f"greedy tokens {agree:.0%} equal")
    return {"parity_max_abs_diff": diff, "greedy_agreement": agree}


def bench(model: str, cells: list[str], reps: int, device: str) -> dict:
    from dsmoe_jax import convert

    cfg = model_config(model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        workers = {side: Worker(side, model, device) for side in ("jax", "torch")}
        try:
            for w in workers.values():
                w.read()  # ready: both built their models at once
            parity = check_parity(workers, cfg.vocab_size, tmp, device)
            times = {cell: {side: [] for side in workers} for cell in cells}
            for cell in cells:
                for w in workers.values():
                    w.ask(op="run", cell=cell)  # warm-up: compilation, allocator, caches
            for rep in range(reps):
                for cell in cells:
                    order = list(workers) if rep % 2 == 0 else list(workers)[::-1]
                    for side in order:
                        times[cell][side].append(workers[side].ask(op="run", cell=cell)["seconds"])
        finally:
            for w in workers.values():
                w.close()
    return {"model": model, "device": device, "dtype": DEVICES[device][0],
            "params": sum(int(np.prod(s)) for s in convert.hf_shapes(cfg).values()), **parity, "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,85m", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, from {list(CELLS)}")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", choices=list(DEVICES), default="cpu",
                        help="cpu: float32; gpu: bfloat16 on both sides (the GPU check's setting)")
    parser.add_argument("--json", help="also write every timing here")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.models, args.device)
    cells = args.cells.split(",")
    unknown = sorted(set(cells) - set(CELLS)) + sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"unknown cell or model {unknown}; cells: {list(CELLS)}, models: {sorted(MODELS)}")
    if args.device == "gpu":  # this process only reads configs: it must not take the GPU's memory
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import jax
    import torch
    import transformers

    print(f"# {args.device} ({DEVICES[args.device][0]}), jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
          "ratio = transformers time / dsmoe-jax time")
    print("| model | params | " + " | ".join(f"{c} min / median" for c in cells) + " |")
    print("|---|---|" + "---|" * len(cells))
    results = []
    for model in args.models.split(","):
        r = bench(model, cells, args.reps, args.device)
        results.append(r)
        ratios = []
        for cell in cells:
            ours, peer = (np.array(r["seconds"][cell][s]) for s in ("jax", "torch"))
            ratios.append(f"{peer.min() / ours.min():.2f}x / {np.median(peer) / np.median(ours):.2f}x")
        print(f"| {model} | {r['params'] / 1e6:.1f}M | " + " | ".join(ratios) + " |", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
