"""The shipped model and experiment configs (TOML), found by name: ``load_config("tiny")``."""
