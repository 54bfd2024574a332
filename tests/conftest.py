"""Shared fixtures: small shapes, fixed seeds."""

import jax
import pytest

from dsmoe_jax import ModelConfig, MoEConfig


@pytest.fixture
def small_cfg() -> ModelConfig:
    """A 3-block model (first dense) with 2 shared + 8 routed experts, top-3."""
    return ModelConfig(
        vocab_size=97, d_model=32, n_layers=3, n_heads=4, d_ff=64, first_k_dense=1, max_seq_len=64,
        init_std=0.05,
        moe=MoEConfig(n_routed_experts=8, n_shared_experts=2, top_k=3, expert_d_ff=16, aux_loss_alpha=0.01),
    )


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Tokenized corpora go to a per-session directory, not the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DSMOE_JAX_CACHE", str(tmp_path_factory.mktemp("token-cache")))
    yield
    mp.undo()
