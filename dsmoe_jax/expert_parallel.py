"""Expert parallelism: the routed experts spread over the mesh's ``expert`` axis.

The one place where tokens cross devices explicitly. Inside ``jax.shard_map`` every device
dispatches its own tokens, sends each expert's rows to the device holding that expert with one
all_to_all, runs its local experts with the grouped backend, and gets the results back with a
second all_to_all before the gate-weighted combine. Each phase runs under a ``jax.named_scope``
(dispatch, exchange, experts, return, combine), so profiles show where the time goes.

The exchange moves fixed-size worst-case buffers with ``lax.all_to_all`` (XLA:CPU has no ragged
all_to_all), or only the routed rows with ``lax.ragged_all_to_all`` on GPU.

Shape legend (per device, inside the exchange): T local tokens, K top-k, A = K*T assignments,
D model width, F expert hidden width, N expert-parallel devices, L = E/N local experts,
R rows of each per-device send buffer, G = N*R rows received.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from dsmoe_jax import dispatch as dispatch_lib
from dsmoe_jax import grouped
from dsmoe_jax.config import MoEConfig
from dsmoe_jax.mesh import EXPERT_AXIS, batch_axes, batch_shards, expert_parallel_size


def send_buffer_rows(cfg: MoEConfig, local_tokens: int, ep: int) -> int:
    """Rows each device reserves per destination in the dense all_to_all. A token's top-k experts
    are distinct, so it sends at most min(K, L) rows to one device: T * min(K, L) can never
    overflow, which keeps dropless routing dropless. With a capacity limit no device receives
    more than L * capacity rows from one sender, a smaller bound when it is."""
    L = cfg.n_routed_experts // ep
    rows = local_tokens * min(cfg.slots, L)
    cap = dispatch_lib.capacity(cfg, local_tokens)
    return rows if cap is None else min(rows, L * cap)


def expert_parallel(x_TD, expert_TK, gate_TK, w_gate_EDF, w_up_EDF, w_down_EFD, cfg: MoEConfig,
                    ragged_all_to_all=None):
    """The routed experts spread over the context mesh's ``expert`` axis, with the same contract
    as ``dispatch.routed_experts``: returns the float32 routed output and ``keep_TK``.

    Tokens stay split over the batch axes (``RULES["batch"]``); each device holds E/N experts.
    Inside ``jax.shard_map`` every device dispatches its own tokens (a capacity limit, if set,
    counts each device's tokens, as GShard's groups do), sends each expert's rows to the device
    holding it with one all_to_all, runs its local experts with the grouped backend, and gets
    the results back with a second all_to_all before the gate-weighted combine.

    The exchange moves fixed-size worst-case buffers with ``lax.all_to_all`` (XLA:CPU has no
    ragged all_to_all), or only the routed rows with ``lax.ragged_all_to_all`` on GPU; pass
    ``ragged_all_to_all`` to choose another implementation of the latter's semantics.
    """
    mesh = jax.sharding.get_abstract_mesh()
    ep, batch, shards = expert_parallel_size(mesh), batch_axes(mesh), batch_shards(mesh)
    T = x_TD.shape[0]
    if T % shards:
        raise ValueError(f"expert parallelism needs the {T} tokens of a batch to split over the mesh's {shards} "
                         "batch shards")
    rows = send_buffer_rows(cfg, T // shards, ep)
    tokens, experts = PartitionSpec(batch, None), PartitionSpec(EXPERT_AXIS, None, None)
    if ragged_all_to_all is None and jax.default_backend() == "gpu":
        ragged_all_to_all = jax.lax.ragged_all_to_all
    body = functools.partial(_exchange, cfg=cfg, ep=ep, rows=rows, ragged_all_to_all=ragged_all_to_all)
    return jax.shard_map(body, in_specs=(tokens, tokens, tokens, experts, experts, experts),
                         out_specs=(tokens, tokens), check_vma=False)(
        x_TD, expert_TK, gate_TK, w_gate_EDF, w_up_EDF, w_down_EFD)


def _exchange(x_TD, expert_TK, gate_TK, w_gate_LDF, w_up_LDF, w_down_LFD, *, cfg: MoEConfig, ep: int, rows: int,
              ragged_all_to_all=None):
    """One device's part of ``expert_parallel`` (inside shard_map). Each sender's rows land in
    block ``sender`` (``rows`` long) of the receive buffer, whichever all_to_all moves them."""
    T, D = x_TD.shape
    N, L, R = ep, w_gate_LDF.shape[0], rows
    with jax.named_scope("dispatch"):
        # Sorted by global expert is sorted by destination: device j holds experts [j L, (j+1) L).
        plan = dispatch_lib.dispatch(expert_TK, N * L, dispatch_lib.capacity(cfg, T))
        x_AD = x_TD[plan.order_A % T]
        sizes_NL = plan.group_sizes_E.reshape(N, L)
        send_N = sizes_NL.sum(1)
        starts_N = jnp.cumsum(send_N) - send_N
        row_A = jnp.arange(x_AD.shape[0])
        dest_A = jnp.searchsorted(starts_N + send_N, row_A, side="right")  # N for dropped rows, past every group
        slot_A = row_A - starts_N[jnp.minimum(dest_A, N - 1)]
    with jax.named_scope("exchange"):
        recv_sizes_NL = jax.lax.all_to_all(sizes_NL, EXPERT_AXIS, 0, 0, tiled=True)
        recv_N = recv_sizes_NL.sum(1)
        if ragged_all_to_all is None:
            send_NRD = jnp.zeros((N, R, D), x_TD.dtype).at[dest_A, slot_A].set(x_AD, mode="drop")
            recv_GD = jax.lax.all_to_all(send_NRD, EXPERT_AXIS, 0, 0, tiled=True).reshape(N * R, D)
        else:
            me = jax.lax.axis_index(EXPERT_AXIS)
            recv_GD = ragged_all_to_all(x_AD, jnp.zeros((N * R, D), x_TD.dtype), starts_N, send_N,
                                        jnp.full((N,), me * R, starts_N.dtype), recv_N, axis_name=EXPERT_AXIS)
    with jax.named_scope("experts"):
        # Each sender's block is sorted by local expert; regroup all blocks by local expert.
        expert_NR = jax.vmap(lambda ends, r: jnp.searchsorted(ends, r, side="right"), (0, None))(
            jnp.cumsum(recv_sizes_NL, axis=1), jnp.arange(R))  # L marks unused buffer rows
        order_G = jnp.argsort(expert_NR.reshape(-1), stable=True)
        y_sorted_GD = grouped.grouped_mlp(recv_GD[order_G], w_gate_LDF, w_up_LDF, w_down_LFD,
                                          recv_sizes_NL.sum(0), backend=cfg.backend)
        y_GD = jnp.zeros_like(y_sorted_GD).at[order_G].set(y_sorted_GD)
    with jax.named_scope("return"):
        if ragged_all_to_all is None:
            back_NRD = jax.lax.all_to_all(y_GD.reshape(N, R, D), EXPERT_AXIS, 0, 0, tiled=True)
            y_AD = back_NRD.at[dest_A, slot_A].get(mode="fill", fill_value=0)
        else:
            # my rows go back to each sender at the offset where that sender's group for me began
            their_starts_N = jax.lax.all_to_all(starts_N, EXPERT_AXIS, 0, 0, tiled=True)
            y_AD = ragged_all_to_all(y_GD, jnp.zeros_like(x_AD, dtype=y_GD.dtype), jnp.arange(N) * R, recv_N,
                                     their_starts_N, send_N, axis_name=EXPERT_AXIS)
    with jax.named_scope("combine"):
        return dispatch_lib.combine(y_AD, plan, gate_TK), dispatch_lib.keep_by_token(plan, T)
