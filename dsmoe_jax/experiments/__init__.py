"""The paper's experiments, one command each (``dsmoe-jax experiment NAME --scale toy|cpu|paper``).

``specs``: scales, arms and experiments as data; ``runner``: training every arm and seed
resumably, and results.json; ``measures``: the specialisation probes and load statistics;
``report``: the Markdown table and the plots. EXPERIMENTS.md holds what came out.
"""

from dsmoe_jax.experiments.runner import ExperimentError, describe_arms, run_experiment, run_probes, run_sensitivity
from dsmoe_jax.experiments.specs import ARMS, EXPERIMENTS, SCALES, SENSITIVITY_ARMS, VARIANTS, arm_config, variant

__all__ = ["ARMS", "EXPERIMENTS", "SCALES", "SENSITIVITY_ARMS", "VARIANTS", "ExperimentError", "arm_config",
           "describe_arms", "run_experiment", "run_probes", "run_sensitivity", "variant"]
