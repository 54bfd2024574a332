"""Joining a multi-process run (several hosts, or several CPU processes on one machine).

    initialize_distributed("10.0.0.1:7777", num_processes=4, process_id=0)   # explicit
    initialize_distributed()            # SLURM / Open MPI / JAX_COORDINATOR_ADDRESS, or one process

Call it before anything touches a device; ``dsmoe-jax train`` does, from its ``--coordinator``,
``--num-processes`` and ``--process-id`` flags.
"""

from __future__ import annotations

import os

import jax

from dsmoe_jax.errors import ConfigError


def _cluster_env_says_multiprocess() -> bool:
    """Whether the environment describes a multi-process job that jax's cluster detection reads."""
    env = os.environ
    return bool(env.get("JAX_COORDINATOR_ADDRESS")) or int(env.get("SLURM_NTASKS", "1")) > 1 \
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, heartbeat_timeout_s: int = 100) -> None:
    """Join a multi-process run. With ``coordinator`` (``HOST:PORT`` of process 0) the three
    arguments are used as given; without, jax's own cluster detection fills them in when the
    environment describes a multi-process job (SLURM, Open MPI, ``JAX_COORDINATOR_ADDRESS``);
    otherwise this is a single-process run and nothing happens. A process that stops sending
    heartbeats for ``heartbeat_timeout_s`` fails the others."""
    if coordinator is None and not _cluster_env_says_multiprocess():
        if num_processes not in (None, 1):
            raise ConfigError(f"num_processes={num_processes} needs coordinator='HOST:PORT' (the address of "
                              "process 0)")
        return
    if coordinator is not None and (num_processes is None or process_id is None):
        raise ConfigError(f"coordinator={coordinator!r} needs num_processes and process_id as well")
    # Collectives between CPU processes (tests, the local launcher) go over gloo; GPUs use NCCL.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout_s)
