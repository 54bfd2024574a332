"""Triton kernels for the grouped gated MLP: the "triton" backend of ``dsmoe_jax.grouped``.

Installed as ``dsmoe_jax.kernels``; importing it (``dsmoe_jax`` does) registers the backend
that ``moe.backend = "triton"`` (and "auto" on GPUs) names. Importing needs neither Triton nor a
GPU: Triton is imported when a kernel first runs. On a GPU the kernels run through jax-triton
(``pip install -e ".[gpu]"``); anywhere else through Triton's interpreter, slowly, which is how
the tests check them on CPU. Which of the two is an explicit argument, ``interpret``, chosen by platform in one
place (``backend.default_interpret``).
"""

if __name__ == "kernels":  # imported from the repository root: see dsmoe_jax/toplevel.py
    from dsmoe_jax.toplevel import defer_to_installed

    defer_to_installed(__name__, __file__)
else:
    from dsmoe_jax.grouped import register_backend

    from .backend import default_interpret, triton_grouped_mlp

    register_backend("triton", triton_grouped_mlp, needs={"gpu": ("triton", "jax_triton"), "*": ("triton",)})

__all__ = ["default_interpret", "triton_grouped_mlp"]
