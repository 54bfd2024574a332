"""Training: optimizer, train step, checkpointing and the loop (installed as ``dsmoe_jax.train``)."""

if __name__ == "train":  # imported from the repository root: see dsmoe_jax/toplevel.py
    from dsmoe_jax.toplevel import defer_to_installed

    defer_to_installed(__name__, __file__)
