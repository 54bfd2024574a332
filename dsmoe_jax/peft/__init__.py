"""Parameter-efficient fine-tuning: what a run trains, as pytree transforms of the params plus
the optimizer's view of them, so that the model code stays as it is.

``esft``: expert-specialised fine-tuning's relevance scores, expert selection and DeepSeek's
``expert_cfg.json``; ``tuning``: the trained part of the params (``train.trainable``).
"""

from dsmoe_jax.peft.esft import ExpertConfig, relevance, select
from dsmoe_jax.peft.tuning import ALL, Tuning, esft_tuning, make_tuning

__all__ = ["ALL", "ExpertConfig", "Tuning", "esft_tuning", "make_tuning", "relevance", "select"]
