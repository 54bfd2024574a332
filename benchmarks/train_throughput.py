"""Training tokens/s: our jitted train step vs a straightforward PyTorch implementation.

The PyTorch side is written here, HF-style: the same architecture (RMSNorm, rotate-half RoPE,
causal attention through ``scaled_dot_product_attention``, dense SwiGLU first blocks, DeepSeekMoE
blocks with a loop over routed experts as in the released remote code), the same balance loss,
AdamW and gradient clipping, on the same batch shape. Both are timed in one process, interleaved,
and the ratio of tokens/s is printed as a markdown row. Needs torch (``pip install torch==2.13.0``).

    python benchmarks/train_throughput.py --configs tiny --steps 10
    python benchmarks/train_throughput.py --configs 100m --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dsmoe_jax
from dsmoe_jax import Config, TrainConfig
from dsmoe_jax.train.optimizer import make_optimizer
from dsmoe_jax.train.step import init_state, make_train_step

# ~100M parameters (34M activated): 8 blocks of width 512, the first dense, 2 shared + 32 routed
# experts of width 256, top-6.
CONFIGS = {
    "tiny": (lambda: dsmoe_jax.load_config("tiny"), 16, 128),
    "100m": (lambda: dsmoe_jax.load_config("tiny", [
        "model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.head_dim=64", "model.d_ff=2048",
        "moe.n_routed_experts=32", "moe.n_shared_experts=2", "moe.top_k=6", "moe.expert_d_ff=256"]), 8, 256),
}


class TorchMLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate, self.up = nn.Linear(d, f, bias=False), nn.Linear(d, f, bias=False)
        self.down = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TorchMoE(nn.Module):
    def __init__(self, d, moe):
        super().__init__()
        self.k, self.alpha = moe.top_k, moe.aux_loss_alpha
        self.router = nn.Linear(d, moe.n_routed_experts, bias=False)
        self.experts = nn.ModuleList(TorchMLP(d, moe.expert_d_ff) for _ in range(moe.n_routed_experts))
        self.shared = TorchMLP(d, moe.n_shared_experts * moe.expert_d_ff) if moe.n_shared_experts else None

    def forward(self, x_BSD):
        x = x_BSD.reshape(-1, x_BSD.shape[-1])
        probs = self.router(x).float().softmax(-1)
        gate, idx = probs.topk(self.k, dim=-1)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            if tok.numel():
                y.index_add_(0, tok, expert(x[tok]) * gate[tok, slot, None].to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(x)
        E = probs.shape[-1]
        f = torch.zeros(E).index_add_(0, idx.reshape(-1), torch.ones(idx.numel())) * E / idx.numel()
        return y.reshape(x_BSD.shape), self.alpha * (f * probs.mean(0)).sum()


class TorchBlock(nn.Module):
    def __init__(self, m, dense):
        super().__init__()
        self.n, self.h, self.theta = m.n_heads, m.head_dim, m.rope_theta
        self.attn_norm, self.ffn_norm = nn.RMSNorm(m.d_model, eps=m.norm_eps), nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.qkv = nn.Linear(m.d_model, 3 * m.n_heads * m.head_dim, bias=False)
        self.o = nn.Linear(m.n_heads * m.head_dim, m.d_model, bias=False)
        self.ffn = TorchMLP(m.d_model, m.d_ff) if dense else TorchMoE(m.d_model, m.moe)

    def rope(self, x, pos):
        inv = self.theta ** (-torch.arange(0, self.h, 2).float() / self.h)
        ang = torch.cat([pos[:, None] * inv] * 2, -1)[:, None, :]  # [S, 1, H]: broadcast over heads
        x1, x2 = x.chunk(2, -1)
        return x * ang.cos() + torch.cat([-x2, x1], -1) * ang.sin()

    def forward(self, x, past=None):
        """``past``: this layer's cached (keys, values) [B, heads, P, H], HF-style; returns the
        output, the balance loss and the keys and values including this call's."""
        B, S, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, S, 3, self.n, self.h).unbind(2)
        start = 0 if past is None else past[0].shape[2]
        pos = torch.arange(start, start + S).float()
        q, k = (self.rope(t, pos).transpose(1, 2) for t in (q, k))
        v = v.transpose(1, 2)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)  # one new query sees all past
        x = x + self.o(a.transpose(1, 2).reshape(B, S, -1))
        out = self.ffn(self.ffn_norm(x))
        y, aux = out if isinstance(out, tuple) else (out, torch.zeros(()))
        return x + y, aux, (k, v)


class TorchDecoder(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.blocks = nn.ModuleList(TorchBlock(m, i < m.first_k_dense) for i in range(m.n_layers))
        self.norm = nn.RMSNorm(m.d_model, eps=m.norm_eps)
        self.head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        for p in self.parameters():
            nn.init.normal_(p, std=m.init_std) if p.ndim > 1 else nn.init.ones_(p)

    def forward(self, tokens, past=None):
        x, aux, present = self.embed(tokens), 0.0, []
        for i, block in enumerate(self.blocks):
            x, a, kv = block(x, None if past is None else past[i])
            aux, present = aux + a, present + [kv]
        return self.head(self.norm(x)), aux, present


def _ours(cfg: Config, batch: np.ndarray):
    opt = make_optimizer(cfg.train)
    state = init_state(dsmoe_jax.init_params(cfg.model, jax.random.key(0)), opt)
    step = jax.jit(make_train_step(cfg, opt))
    batch = jnp.asarray(batch)

    def run():
        nonlocal state
        state, m = step(state, batch)
        return float(m.loss)

    return run


def _torch(cfg: Config, batch: np.ndarray):
    torch.manual_seed(0)
    model = TorchDecoder(cfg.model)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.b1, t.b2), weight_decay=t.weight_decay)
    tokens = torch.from_numpy(batch).long()

    def run():
        logits, aux, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)) + aux
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        return float(loss)

    return run


def bench(name: str, steps: int) -> dict:
    make_cfg, batch_size, seq_len = CONFIGS[name]
    cfg = make_cfg()
    cfg = dataclasses.replace(cfg, train=TrainConfig(batch_size=batch_size, seq_len=seq_len, lr=1e-3, warmup_steps=0))
    batch = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    runs = {"ours": _ours(cfg, batch), "torch": _torch(cfg, batch)}
    for run in runs.values():
        run()  # compile / warm up
    times = {k: [] for k in runs}
    for _ in range(steps):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    tokens = batch_size * seq_len
    tps = {k: tokens / float(np.median(v)) for k, v in times.items()}
    total, active = dsmoe_jax.count_params(cfg)
    return {"config": name, "params": f"{total / 1e6:.1f}M / {active / 1e6:.1f}M", "batch": f"{batch_size}x{seq_len}",
            "ours": tps["ours"], "torch": tps["torch"], "ratio": tps["ours"] / tps["torch"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,100m")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"# jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print("| config | params (total / activated) | batch | ours tokens/s | PyTorch tokens/s | ours / PyTorch |")
    print("|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        r = bench(name, args.steps)
        print(f"| {r['config']} | {r['params']} | {r['batch']} | {r['ours']:.0f} | {r['torch']:.0f} | "
              f"{r['ratio']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
