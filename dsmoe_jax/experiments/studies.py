"""Every experiment as one ``Study``, in one registry (``STUDIES``) that the command line, its
``--dry-run`` and ``--resume``, the driver and the report all read.

A study names its arms (``specs.ARMS``), how they are compared (every pair, or each against a
baseline), the settings it runs them in (``specs.VARIANTS``: only the sensitivity study and its
probes take more than the unchanged one) and what it measures beyond the validation loss.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping

from dsmoe_jax.errors import ExperimentError
from dsmoe_jax.experiments import measures
from dsmoe_jax.experiments.specs import ARMS, SCALES, SENSITIVITY_ARMS, VARIANTS, Scale


@dataclasses.dataclass(frozen=True)
class Measure:
    """What a study measures on its trained runs beyond the validation loss: ``per_run`` on
    every run (its output's numbers at ``compared``, e.g. ``loss/code``, are compared between
    arms as the loss is), or ``summary`` once over all of them."""

    name: str
    per_run: Callable[[pathlib.Path, Scale], dict] | None = None
    compared: tuple[str, ...] = ()
    summary: Callable[[measures.Trained], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    title: str  # the paper's table or figure
    arms: tuple[str, ...]
    paper: Mapping[str, float] = dataclasses.field(default_factory=dict)  # the paper's Pile loss per arm
    baseline: str | None = None  # None: every pair of arms compared; else each other arm against it
    compared: tuple[tuple[str, str], ...] = ()  # the pairs (A, B) compared, where not every pair nor a baseline
    variants: bool = False  # takes --variants (settings of specs.VARIANTS)
    all_variants: bool = False  # without --variants: every variant that applies at the scale (else base)
    more_arms: bool = False  # takes --arms: further arms trained and compared beside its own
    measures: tuple[Measure, ...] = ()
    finetune: bool = False  # the arms are pretrained bases, fine-tuned by every method on every task (finetune.py)

    def variant_names(self, scale: Scale, chosen: list[str] | None) -> list[str]:
        """The variants to run: ``chosen``, or the default (every variant that applies at this
        scale, or ``base``)."""
        if chosen and not self.variants:
            raise ExperimentError(f"--variants is for the {' and '.join(variant_studies())} studies; {self.name} "
                                  "runs its arms in the scale's setting")
        if chosen:
            return chosen
        return [v.name for v in VARIANTS.values() if v.applies_to(scale)] if self.all_variants else ["base"]

    def arm_names(self, chosen: list[str] | None) -> tuple[str, ...]:
        """The study's arms plus ``chosen`` further ones (``--arms``)."""
        if not chosen:
            return self.arms
        if not self.more_arms:
            raise ExperimentError(f"--arms is for the {' and '.join(variant_studies())} studies; {self.name} "
                                  "compares its own arms")
        unknown = [a for a in chosen if a not in ARMS]
        if unknown:
            raise ExperimentError(f"unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
        repeated = sorted({a for a in chosen if chosen.count(a) > 1})
        if repeated:
            raise ExperimentError(f"--arms names {repeated[0]} twice; each arm is trained once")
        return self.arms + tuple(a for a in chosen if a not in self.arms)

    def pairs(self, arms: tuple[str, ...]) -> list[tuple[str, str]]:
        """(A, B) of every comparison A - B."""
        if self.compared:
            return list(self.compared)
        if self.baseline is None:
            return [(a, b) for i, a in enumerate(arms) for b in arms[i + 1:]]
        return [(a, self.baseline) for a in arms if a != self.baseline]


_EXPERTS = Measure("experts", per_run=measures.experts_arm, compared=("loss/code", "loss/documentation", "experts/all"))
_PROBES = Measure("probes", per_run=measures.probe_arm, compared=("loss/code", "loss/documentation"))

STUDIES = {s.name: s for s in (
    Study("architectures", "Table 1: DeepSeekMoE against Dense, Hash, Switch and GShard (plus Table 2's "
          "GShard x1.5 and Dense x16)",
          ("dense", "hash", "switch", "gshard", "deepseekmoe", "gshard_x1.5", "dense_x16"),
          paper={"dense": 2.060, "hash": 1.932, "switch": 1.881, "gshard": 1.867, "deepseekmoe": 1.808}),
    Study("ablation", "Figure 3: shared-expert isolation and fine-grained segmentation, one at a time",
          ("gshard", "shared_isolation", "fine_x2", "deepseekmoe")),
    Study("shared-ratio", "Section 4.4: the ratio of shared to routed experts",
          ("deepseekmoe", "shared_2", "shared_4")),
    Study("specialisation", "Section 4.5: expert redundancy, the shared expert, fewer activated experts",
          ("deepseekmoe", "gshard", "gshard_x1.5"),
          measures=(Measure("specialisation", summary=measures.specialisation),)),
    Study("balance", "Expert and device load with the balance losses off, at the paper's alpha and at 10x",
          ("balance_off", "deepseekmoe", "balance_10x", "balance_device"),
          measures=(Measure("balance", summary=measures.balance),)),
    Study("sensitivity", "DeepSeekMoE against GShard, one change of the setting at a time", SENSITIVITY_ARMS,
          baseline="gshard", variants=True, all_variants=True, more_arms=True),
    Study("probes", "The sensitivity study's arms probed: loss on code and on documentation, expert load, routing "
          "by token id", SENSITIVITY_ARMS, baseline="gshard", variants=True, more_arms=True, measures=(_PROBES,)),
    Study("dynamic", "Dynamic routing (arXiv 2403.07652): top-p against top-k routing on coarse (GShard) and "
          "fine-grained (DeepSeekMoE) experts", ("gshard", "gshard_top_p", "deepseekmoe", "deepseekmoe_top_p"),
          compared=(("gshard_top_p", "gshard"), ("deepseekmoe_top_p", "deepseekmoe")), measures=(_EXPERTS,)),
    Study("dynamic-coarse", "Dynamic routing's own claim alone: top-p against top-2 routing on GShard's coarse experts "
          "(the pair to run longer)", ("gshard", "gshard_top_p"), compared=(("gshard_top_p", "gshard"),),
          measures=(_EXPERTS,)),
    Study("fp8", "DeepSeek-V3's FP8 training (arXiv 2412.19437, section 3.3): FP8 GEMMs against the same model "
          "unquantised", ("deepseekmoe", "deepseekmoe_fp8"), compared=(("deepseekmoe_fp8", "deepseekmoe"),)),
    Study("finetune", "ESFT (arXiv 2407.01906): full fine-tuning, ESFT-Gate, ESFT-Token, LoRA and the frozen base on "
          "two tasks, from pretrained fine-grained and coarse bases", ("deepseekmoe", "gshard"), finetune=True),
)}


def variant_studies() -> list[str]:
    return [s.name for s in STUDIES.values() if s.variants]


def study(name: str) -> Study:
    if name not in STUDIES:
        raise ExperimentError(f"unknown experiment {name!r}; choose one of {', '.join(STUDIES)}")
    return STUDIES[name]


def scale(name: str) -> Scale:
    if name not in SCALES:
        raise ExperimentError(f"unknown scale {name!r}; choose one of {', '.join(SCALES)}")
    return SCALES[name]
