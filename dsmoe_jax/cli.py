"""The ``dsmoe-jax`` command line.

    dsmoe-jax info --config tiny                      # architecture, parameters, FLOPs per token
    dsmoe-jax info --config configs/16b.toml --set model.n_layers=4
"""

from __future__ import annotations

import argparse
import sys

from dsmoe_jax.config import Config, ConfigError, load_config
from dsmoe_jax.model import count_params, flops_per_token


def describe(cfg: Config, seq_len: int | None = None) -> str:
    """A short human-readable summary of ``cfg``'s architecture and size."""
    m = cfg.model
    seq_len = seq_len or cfg.train.seq_len
    total, activated = count_params(m)
    fwd = flops_per_token(m, seq_len)
    lines = [
        f"layers        {m.n_layers} ({m.first_k_dense} dense, {m.n_moe_layers} MoE), d_model {m.d_model}",
        f"attention     {m.n_heads} heads x {m.head_dim} ({m.kv_heads} kv heads), RoPE theta {m.rope_theta:g}",
        f"dense FFN     {m.d_ff}",
    ]
    if m.moe is not None and m.n_moe_layers:
        e = m.moe
        lines.append(
            f"MoE           {e.n_shared_experts} shared + {e.n_routed_experts} routed experts of width "
            f"{e.expert_d_ff}, top-{e.top_k} ({e.routing} routing), backend {e.backend}"
        )
    lines += [
        f"vocabulary    {m.vocab_size}, untied LM head; params {m.param_dtype}, compute {m.dtype}",
        f"parameters    {total:,} total, {activated:,} activated per token",
        f"FLOPs/token   {fwd / 1e9:.3f} GFLOP forward, {3 * fwd / 1e9:.3f} GFLOP train step (seq {seq_len})",
    ]
    return "\n".join(lines)


def _info(args) -> None:
    print(describe(load_config(args.config, args.set)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsmoe-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a config's architecture, parameter counts and FLOPs")
    info.add_argument("--config", required=True, help="TOML file or shipped config name (tiny, 2b, 16b, ...)")
    info.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a key")
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ConfigError as e:
        print(f"dsmoe-jax: config error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
