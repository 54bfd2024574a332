"""Triton kernels for the grouped gated MLP: the "triton" backend of ``dsmoe_jax.grouped``.

Installed as ``dsmoe_jax.kernels``. ``moe.backend = "triton"`` (and "auto" on GPUs) loads this
package by name on first use. On a GPU the kernels run through jax-triton (``pip install -e
".[gpu]"``); anywhere else through Triton's interpreter, slowly, which is how the tests check
them on CPU. Which of the two is an explicit argument, ``interpret``, chosen by platform in one
place (``backend.default_interpret``).
"""

if __name__ == "kernels":  # imported from the repository root: see dsmoe_jax/toplevel.py
    from dsmoe_jax.toplevel import defer_to_installed

    defer_to_installed(__name__, __file__)
else:
    from .backend import default_interpret, triton_grouped_mlp

__all__ = ["default_interpret", "triton_grouped_mlp"]
