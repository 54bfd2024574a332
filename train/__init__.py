"""Training: optimizer, train step, checkpointing and the loop (installed as ``dsmoe_jax.train``)."""
