"""Triton kernels for the grouped gated MLP (the GPU backend of dsmoe_jax.grouped).

Installed as ``dsmoe_jax.kernels``. Not written yet: until they land, GPUs use the "ragged"
backend (``jax.lax.ragged_dot``) and CPUs the "tiled" one.
"""
