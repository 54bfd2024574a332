"""An independent PyTorch statement of the dynamic-routing model's forward (arXiv 2403.07652, the
released Dynamic_MoE modeling code's layout), the oracle of the Dynamic_MoE conversion tests.

Written from the paper's rule, token by token in float64 where it decides: the router's softmax
probabilities sorted best first; experts are taken until their running sum exceeds the threshold
(the expert that carries it past is taken too); the MoE output is the sum of each taken expert's
SwiGLU output times its probability. Blocks without routing (every block whose index is not a
multiple of ``expert_frequency``) hold one SwiGLU FFN. Attention is multi-head with rotate-half
RoPE at base 10000. Parameter names follow the released checkpoints: ``state_dict()`` of this
module has exactly their tensor names, the per-layer ``inv_freq`` buffer included.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Rotary(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)))

    def forward(self, x):  # x [B, N, S, H]
        angles = torch.arange(x.shape[2], dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width, bias=False) for _ in range(4))
        self.rotary_emb = Rotary(self.head_dim)

    def forward(self, x):
        B, S, D = x.shape
        split = lambda t: t.view(B, S, self.heads, self.head_dim).transpose(1, 2)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q, k = self.rotary_emb(q), self.rotary_emb(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        return self.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D))


class DynamicFFN(nn.Module):
    """The router and experts of an MoE block, or ``mlp`` (one dense FFN) elsewhere."""

    def __init__(self, width: int, hidden: int, experts: int, threshold: float, routed: bool):
        super().__init__()
        self.threshold = threshold
        self.chosen: list[int] = []  # experts per token of the last forward
        if routed:
            self.router = nn.Linear(width, experts, bias=False)
            self.experts = nn.ModuleList(SwiGLU(width, hidden) for _ in range(experts))
        else:
            self.mlp = SwiGLU(width, hidden)

    def forward(self, x):
        if not hasattr(self, "router"):
            return self.mlp(x)
        flat = x.reshape(-1, x.shape[-1])
        probs = self.router(flat).softmax(-1)
        out = torch.zeros_like(flat)
        self.chosen = []
        for t in range(flat.shape[0]):
            running, taken = 0.0, 0
            for e in sorted(range(probs.shape[1]), key=lambda e: -float(probs[t, e])):
                out[t] += probs[t, e] * self.experts[e](flat[t])
                running, taken = running + float(probs[t, e]), taken + 1
                if running > self.threshold:
                    break
            self.chosen.append(taken)
        return out.view_as(x)


class Block(nn.Module):
    def __init__(self, c: dict, index: int):
        super().__init__()
        self.input_norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c["hidden_size"], c["num_attention_heads"])
        self.mlp = DynamicFFN(c["hidden_size"], c["intermediate_size"], c["num_experts"], c["top_p_threshold"],
                              routed=index % c["expert_frequency"] == 0)

    def forward(self, h):
        h = h + self.self_attn(self.input_norm(h))
        return h + self.mlp(self.post_attention_norm(h))


class Body(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c, i) for i in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])


class DynamicMoEReference(nn.Module):
    """Logits of token ids ``[B, S]``; ``experts_per_token()`` after a forward: per MoE block, the
    experts each token took."""

    def __init__(self, config: dict):
        super().__init__()
        self.model = Body(config)
        self.lm_head = nn.Linear(config["hidden_size"], config["vocab_size"], bias=False)

    def forward(self, ids):
        h = self.model.embed_tokens(ids)
        for block in self.model.layers:
            h = block(h)
        return self.lm_head(self.model.norm(h))

    def experts_per_token(self) -> list[list[int]]:
        return [block.mlp.chosen for block in self.model.layers if hasattr(block.mlp, "router")]
