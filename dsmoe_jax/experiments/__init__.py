"""The paper's experiments, one command each (``dsmoe-jax experiment NAME --scale toy|cpu|paper``).

``specs``: scales, arms and variants as functions from a config to a config; ``studies``: every
experiment as a ``Study`` in one registry; ``runner``: the one driver (train each run once,
resumably; evaluate; measure; compare); ``measures``: the specialisation probes and load
statistics; ``stats``: paired intervals, Holm's correction, clustered standard errors;
``records``: the typed results and results.json; ``report``: the Markdown tables and plots.
EXPERIMENTS.md holds what came out.
"""

from dsmoe_jax.errors import ExperimentError
from dsmoe_jax.experiments.records import StudyResults, read_results
from dsmoe_jax.experiments.runner import describe, plan, run_study
from dsmoe_jax.experiments.specs import ARMS, SCALES, SENSITIVITY_ARMS, VARIANTS, arm_config, variant
from dsmoe_jax.experiments.studies import STUDIES

__all__ = ["ARMS", "SCALES", "SENSITIVITY_ARMS", "STUDIES", "VARIANTS", "ExperimentError", "StudyResults",
           "arm_config", "describe", "plan", "read_results", "run_study", "variant"]
