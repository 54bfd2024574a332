"""Parameter-efficient fine-tuning: what a run trains, as pytree transforms of the params plus
the optimizer's view of them, so that the model code stays as it is.

``esft``: expert-specialised fine-tuning's relevance scores, expert selection and DeepSeek's
``expert_cfg.json``; ``lora``: low-rank adapters (``train.lora``), merged, combined, and saved and
read in PEFT's format; ``tuning``: the trained part (``train.trainable``, ``train.lora``).
"""

from dsmoe_jax.peft.esft import ExpertConfig, relevance, select
from dsmoe_jax.peft.lora import init_adapter, load_peft, merge, save_peft, weighted_sum
from dsmoe_jax.peft.tuning import ALL, Tuning, esft_tuning, lora_tuning, make_tuning

__all__ = ["ALL", "ExpertConfig", "Tuning", "esft_tuning", "init_adapter", "load_peft", "lora_tuning", "make_tuning",
           "merge", "relevance", "save_peft", "select", "weighted_sum"]
