"""The shipped model and experiment configs (TOML), found by name: ``load_config("tiny")``."""

if __name__ == "configs":  # imported from the repository root: see dsmoe_jax/toplevel.py
    from dsmoe_jax.toplevel import defer_to_installed

    defer_to_installed(__name__, __file__)
