"""dsmoe-jax vs Hugging Face transformers on the same weights, side by side (CPU, float32).

The peer is transformers' ``Qwen2MoeForCausalLM`` (its default MoE path, grouped_mm experts, and
SDPA attention) holding exactly our weights through the mapping the conversion tests use: a dense
first layer via ``mlp_only_layers``, zero q/k/v biases, the shared-expert gate fixed at
sigmoid(0) = 0.5 with the shared down projection doubled. Each side runs in its own process (one
at a time, so they never share the cores), repetitions interleaved; parity (logits and greedy
tokens) is checked before anything is timed. Cells:

  decode_b1, decode_b8  greedy decoding after a 32-token prompt: seconds per new token, from
                        generate(64 new) - generate(1 new) on each side (our ``generate``, HF's
                        ``model.generate``)
  prefill               one forward over 8 x 512 tokens that fills the KV cache
  train                 one training step on 8 x 256 tokens: forward, backward (cross-entropy
                        plus the balance loss), global-norm clipping, AdamW

Prints a markdown table of speed ratios (transformers time / dsmoe-jax time: above 1 we are
faster), min and median over the repetitions, and writes every timing to ``--json``.

    python benchmarks/vs_transformers.py --models tiny --reps 3
    python benchmarks/vs_transformers.py --models tiny,85m --reps 7 --json vs_transformers.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Our configs: the shipped tiny one and an ~85M-parameter model (2 shared + 32 routed experts of
# width 256, top-4).
MODELS = {
    "tiny": [],
    "85m": ["model.vocab_size=8192", "model.d_model=512", "model.n_layers=6", "model.n_heads=8",
            "model.head_dim=64", "model.d_ff=2048", "moe.n_routed_experts=32", "moe.n_shared_experts=2",
            "moe.top_k=4", "moe.expert_d_ff=256"],
}
CELLS = {
    "decode_b1": {"batch": 1, "prompt": 32, "new": 64},
    "decode_b8": {"batch": 8, "prompt": 32, "new": 64},
    "prefill": {"batch": 8, "seq": 512},
    "train": {"batch": 8, "seq": 256},
}
REPLY = "@@"  # marks the workers' replies on stdout; anything else there is library chatter


def model_config(name: str):
    import dsmoe_jax

    return dsmoe_jax.load_config("tiny", MODELS[name]).model


def tokens(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32)


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_seconds(greedy, ids: np.ndarray, new: int) -> float:
    """Seconds per decoded token: generating ``new`` tokens minus generating one (the prefill)."""
    return (seconds(lambda: greedy(ids, new)) - seconds(lambda: greedy(ids, 1))) / (new - 1)


# ---- the two sides: each builds its model from the same HF tensors and times one cell --------


class Jax:
    def __init__(self, model: str, weights: dict):
        import jax
        import jax.numpy as jnp

        import dsmoe_jax
        from dsmoe_jax import convert, inference
        from dsmoe_jax.train.optimizer import make_optimizer
        from dsmoe_jax.train.step import init_state, make_train_step

        self.jax, self.jnp, self.inference = jax, jnp, inference
        self.cfg = cfg = model_config(model)
        self.params = jax.tree.map(jnp.asarray, convert.params_from_hf(weights.__getitem__, weights.__contains__, cfg))
        c = CELLS["train"]
        train_cfg = dsmoe_jax.load_config("tiny", [*MODELS[model], f"train.batch_size={c['batch']}",
                                                    f"train.seq_len={c['seq']}"])
        optimizer = make_optimizer(train_cfg.train)
        self.train_step = jax.jit(make_train_step(train_cfg, optimizer), donate_argnums=0)
        self.state = init_state(jax.tree.map(jnp.copy, self.params), optimizer)  # donated by each step
        self.prefill = jax.jit(inference.prefill, static_argnames="cfg")
        self.generate = jax.jit(inference.generate, static_argnames=("cfg", "max_new_tokens", "temperature"))

    def logits(self, ids: np.ndarray) -> np.ndarray:
        from dsmoe_jax import forward

        return np.asarray(forward(self.params, self.jnp.asarray(ids), self.cfg)[0])

    def greedy(self, ids: np.ndarray, new: int) -> np.ndarray:
        out = self.generate(self.params, self.jnp.asarray(ids), cfg=self.cfg, max_new_tokens=new,
                            rng=self.jax.random.key(0), temperature=0.0)
        return np.asarray(self.jax.block_until_ready(out))

    def run(self, cell: str) -> float:
        c, block = CELLS[cell], self.jax.block_until_ready
        if cell == "train":
            windows = self.jnp.asarray(tokens(self.cfg.vocab_size, c["batch"], c["seq"] + 1))

            def step():
                self.state, metrics = self.train_step(self.state, windows)
                block(metrics.loss)

            return seconds(step)
        if cell == "prefill":
            ids = self.jnp.asarray(tokens(self.cfg.vocab_size, c["batch"], c["seq"]))
            cache = self.inference.init_cache(self.cfg, c["batch"], c["seq"])
            return seconds(lambda: block(self.prefill(self.params, ids, cache, cfg=self.cfg)))
        return decode_seconds(self.greedy, tokens(self.cfg.vocab_size, c["batch"], c["prompt"]), c["new"])


class Torch:
    def __init__(self, model: str, weights: dict):
        import torch

        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import qwen2moe_oracle

        from dsmoe_jax import convert

        self.torch, self.cfg = torch, model_config(model)
        self.model = qwen2moe_oracle(weights, convert.config_to_hf(self.cfg))
        self.model.config._attn_implementation = "sdpa"  # the oracle uses eager attention for exactness
        self.model.config.output_router_logits = True
        self.model.config.router_aux_loss_coef = self.cfg.moe.aux_loss_alpha
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model(self.torch.from_numpy(ids).long()).logits.numpy()

    def greedy(self, ids: np.ndarray, new: int) -> np.ndarray:
        with self.torch.inference_mode():
            ids_t = self.torch.from_numpy(ids).long()
            out = self.model.generate(ids_t, attention_mask=self.torch.ones_like(ids_t), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, ids.shape[1]:].numpy()

    def run(self, cell: str) -> float:
        torch, c = self.torch, CELLS[cell]
        if cell == "train":
            windows = torch.from_numpy(tokens(self.cfg.vocab_size, c["batch"], c["seq"] + 1)).long()
            self.model.train()

            def step():
                out = self.model(windows[:, :-1])
                ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), windows[:, 1:].flatten())
                (ce + self.model.config.router_aux_loss_coef * out.aux_loss).backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)

            t = seconds(step)
            self.model.eval()
            return t
        if cell == "prefill":
            ids = torch.from_numpy(tokens(self.cfg.vocab_size, c["batch"], c["seq"])).long()

            def prefill():
                with torch.inference_mode():
                    self.model(ids, use_cache=True)

            return seconds(prefill)
        return decode_seconds(self.greedy, tokens(self.cfg.vocab_size, c["batch"], c["prompt"]), c["new"])


def worker(side: str, model: str, weights_path: str) -> None:
    """Serve requests from the parent on stdin, one JSON object per line."""
    with np.load(weights_path) as f:
        weights = dict(f)
    impl = {"jax": Jax, "torch": Torch}[side](model, weights)
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
    def __init__(self, side: str, model: str, weights_path: pathlib.Path):
        self.side = side
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", side, "--models", model,
                                      "--weights", str(weights_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.read()

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


def check_parity(workers: dict, vocab: int, tmp: pathlib.Path) -> float:
    ids_path = tmp / "ids.npy"
    np.save(ids_path, tokens(vocab, 2, 64, seed=1))
    logits, greedy = {}, {}
    for side, w in workers.items():
        greedy[side] = w.ask(op="parity", ids=str(ids_path), out=str(tmp / f"{side}.npy"))["greedy"]
        logits[side] = np.load(tmp / f"{side}.npy")
    diff = float(np.max(np.abs(logits["jax"] - logits["torch"])))
    if diff > 1e-4 or greedy["jax"] != greedy["torch"]:
        raise SystemExit(f"parity failed: max |logits difference| {diff:.2e}, greedy tokens "
                         f"{'equal' if greedy['jax'] == greedy['torch'] else 'differ'}")
    return diff


def bench(model: str, cells: list[str], reps: int) -> dict:
    from dsmoe_jax import convert

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import random_hf_checkpoint

    cfg = model_config(model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        np.savez(tmp / "weights.npz", **random_hf_checkpoint(cfg))
        workers = {side: Worker(side, model, tmp / "weights.npz") for side in ("jax", "torch")}
        try:
            diff = check_parity(workers, cfg.vocab_size, tmp)
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
    return {"model": model, "params": sum(int(np.prod(s)) for s in convert.hf_shapes(cfg).values()),
            "parity_max_abs_diff": diff, "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,85m", help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, from {list(CELLS)}")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="also write every timing here")
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.models, args.weights)
    cells = args.cells.split(",")
    unknown = sorted(set(cells) - set(CELLS)) + sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"unknown cell or model {unknown}; cells: {list(CELLS)}, models: {sorted(MODELS)}")
    import jax
    import torch
    import transformers

    print(f"# jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}; ratio = transformers time / dsmoe-jax time")
    print("| model | params | " + " | ".join(f"{c} min / median" for c in cells) + " |")
    print("|---|---|" + "---|" * len(cells))
    results = []
    for model in args.models.split(","):
        r = bench(model, cells, args.reps)
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
