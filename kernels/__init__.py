"""Triton kernels for the grouped gated MLP: the "triton" backend of ``dsmoe_jax.grouped``.

Installed as ``dsmoe_jax.kernels``; importing it registers the backend (``moe.backend =
"triton"``, and "auto" on GPUs). On a GPU the kernels run through jax-triton (``pip install
-e ".[gpu]"``); anywhere else through Triton's interpreter, slowly, which is how the tests check
them on CPU. The interpreter is chosen by setting ``TRITON_INTERPRET=1`` before the kernels are
defined (Triton reads it when ``@triton.jit`` runs); set ``TRITON_INTERPRET=0`` to force the
compiled path.
"""

import os

import jax

if jax.default_backend() != "gpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsmoe_jax.grouped import register_backend  # noqa: E402  (after choosing the interpreter)

from .backend import triton_grouped_mlp  # noqa: E402

register_backend("triton", triton_grouped_mlp)

__all__ = ["triton_grouped_mlp"]
