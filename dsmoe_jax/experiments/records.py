"""What crosses the experiments' modules and lands on disk, as typed records.

``RunResult`` is one trained and evaluated arm and seed (a run's ``final.json``); ``ArmResult``
an arm over its seeds; ``Comparison`` two arms paired by seed on one metric; ``StudyResults``
a whole study (``results.json``, with ``schema_version``). ``read_results`` also reads the
results.json files written before the schema was versioned (three shapes: the paper's
experiments, sensitivity, probes), so every committed result stays readable.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import pathlib
import platform
import resource
import subprocess
import types
import typing
from collections.abc import Sequence

from dsmoe_jax.atomic import atomic_file
from dsmoe_jax.errors import ExperimentError
from dsmoe_jax.experiments import stats

SCHEMA_VERSION = 2
LOSS = "val_loss"  # the metric every study compares


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What produced one training invocation, recorded when it trained (not when results were
    written: a study that reuses arms trained earlier keeps their provenance)."""

    date: str  # ISO 8601, UTC, when training started
    commit: str | None  # None outside a git checkout
    dirty: bool | None  # uncommitted changes in the checkout
    versions: dict  # python, jax, flax, optax, orbax
    resumed: bool  # continued from a checkpoint of an earlier invocation
    wall_s: float
    peak_rss_bytes: int

    @classmethod
    def now(cls, resumed: bool, wall_s: float) -> Provenance:
        commit, dirty = _git_state()
        return cls(datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), commit, dirty, _versions(),
                   resumed, wall_s, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str | None, bool | None]:
    """The checkout's commit and whether it has uncommitted changes (None, None outside one),
    read once per process: the code a long study runs is what it imported, while the checkout's
    HEAD may move on under it."""
    here = pathlib.Path(__file__).parent
    try:
        run = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=here)
        head = run("rev-parse", "HEAD")
        if head.returncode:
            return None, None
        return head.stdout.strip(), bool(run("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        return None, None


def _versions() -> dict:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for package in ("jax", "flax", "optax", "orbax-checkpoint"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One trained and evaluated arm and seed: a run's ``final.json``. Fields added since the
    first runs default to empty, so older files still read."""

    val_loss: float
    val_loss_stderr: float  # over the validation windows
    eval_tokens: int
    train_tokens: int
    steps: int
    wall_s: float  # every invocation that trained the run, summed
    invocations: int = 1
    resumed: bool = False
    # each validation window's loss and the held-out document it starts in: the same windows for
    # every arm of a seed
    val_window_losses: tuple[float, ...] = ()
    val_window_documents: tuple[int, ...] = ()
    # (training tokens seen, validation loss) at each validation during training, on the scale's
    # curve_tokens: the same windows for every arm
    val_curve: tuple[tuple[int, float], ...] = ()
    train_curve: tuple[tuple[int, float], ...] = ()  # (step, training cross-entropy) at each logged step
    trained: tuple[Provenance, ...] = ()  # one per invocation that trained the run

    @classmethod
    def read(cls, path: pathlib.Path) -> RunResult:
        return decode(cls, json.loads(path.read_text()))

    def write(self, path: pathlib.Path) -> None:
        write_json(path, self)


@dataclasses.dataclass(frozen=True)
class Curve:
    """Validation loss against training tokens seen, mean over seeds, where every seed logged."""

    tokens: tuple[int, ...] = ()
    mean: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class GapCurve:
    """A - B against training tokens seen, paired by seed at each validation; ``seeds`` counts the
    pairs that logged a point, and its interval is None where fewer than two did."""

    tokens: tuple[int, ...] = ()
    mean: tuple[float, ...] = ()
    ci95: tuple[tuple[float, float] | None, ...] = ()
    seeds: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class ArmResult:
    """One arm (in one variant of the setting) over the study's seeds."""

    arm: str
    variant: str
    label: str
    structure: str
    seeds: tuple[int, ...]
    val_loss: tuple[float, ...]
    settings: dict = dataclasses.field(default_factory=dict)  # what the arm sets on top of its scale
    params_total: int | None = None
    params_activated: int | None = None
    val_loss_stderr: tuple[float, ...] = ()
    eval_tokens: int | None = None
    train_tokens: int | None = None
    wall_s: tuple[float, ...] = ()
    resumed: tuple[bool, ...] = ()
    val_curve: Curve = Curve()
    paper_val_loss: float | None = None
    trained: tuple[tuple[Provenance, ...], ...] = ()  # per seed

    @property
    def key(self) -> str:
        return self.arm if self.variant == "base" else f"{self.arm}@{self.variant}"

    @property
    def mean(self) -> float:
        return sum(self.val_loss) / len(self.val_loss)

    @property
    def seed_std(self) -> float:
        n = len(self.val_loss)
        return (sum((v - self.mean) ** 2 for v in self.val_loss) / (n - 1)) ** 0.5 if n > 1 else 0.0


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Arm A against arm B on one metric, paired by seed; ``p_holm`` is Holm's adjustment over
    every comparison of the study (the family-wise view of its table)."""

    variant: str
    metric: str
    a: str
    b: str
    seeds: tuple[int, ...]
    per_seed: tuple[float, ...]
    mean: float
    seed_std: float | None
    ci95: tuple[float, float] | None
    p_value: float | None = None
    p_holm: float | None = None
    window_se: tuple[float | None, ...] = ()  # per seed: the paired standard error over the shared windows
    window_se_by_document: tuple[float | None, ...] = ()  # the same, windows clustered by document
    curve: GapCurve | None = None

    @classmethod
    def of(cls, variant: str, metric: str, a: str, b: str, seeds: Sequence[int], per_seed: Sequence[float],
           **rest) -> Comparison:
        s = stats.paired(per_seed)
        return cls(variant, metric, a, b, tuple(seeds), tuple(per_seed), s.mean, s.sd, s.ci95, s.p_value, **rest)


@dataclasses.dataclass(frozen=True)
class VariantInfo:
    """One setting a study ran its arms in (``base``: the scale unchanged)."""

    name: str
    reason: str
    scale: dict = dataclasses.field(default_factory=dict)  # the scale's fields it changes
    settings: dict = dataclasses.field(default_factory=dict)  # config keys it changes (on DeepSeekMoE)
    vocab_size: int = 0
    tokens_per_arm: int | None = None


@dataclasses.dataclass(frozen=True)
class StudyResults:
    """A study's ``results.json``."""

    study: str
    title: str
    scale: str
    seeds: tuple[int, ...]
    arms: tuple[ArmResult, ...]
    comparisons: tuple[Comparison, ...]
    variants: tuple[VariantInfo, ...] = ()
    measures: dict = dataclasses.field(default_factory=dict)  # each measure's output, by its name
    scale_config: dict = dataclasses.field(default_factory=dict)
    tokens_per_arm: int | None = None
    wall_s: float | None = None  # this invocation (arms trained earlier are reused)
    environment: dict = dataclasses.field(default_factory=dict)  # what wrote the file
    plots: tuple[str, ...] = ()
    schema_version: int = SCHEMA_VERSION

    def arm(self, name: str, variant: str = "base") -> ArmResult:
        return next(a for a in self.arms if a.arm == name and a.variant == variant)

    def write(self, path: pathlib.Path) -> None:
        write_json(path, self)


@dataclasses.dataclass(frozen=True)
class FinetuneRun:
    """One fine-tuned (or frozen) model's measurements (the fine-tuning study): ``final.json``."""

    base: str
    task: str
    method: str
    seed: int
    answer_loss: float
    answer_loss_se: float  # over held-out examples (the ratio estimator's)
    answer_tokens: int
    examples: int  # held-out examples with at least one answer token inside the window
    exact_match: float | None  # share of those answered exactly (tasks with one right answer)
    val_loss: float  # on the base's pretraining validation windows
    forgetting: float  # val_loss - the base's
    trained_params: int
    total_params: int
    optimizer_bytes: int
    experts: dict = dataclasses.field(default_factory=dict)  # ESFT: MoE layer (a string, as in JSON) -> experts trained
    wall_s: float = 0.0
    trained: tuple[Provenance, ...] = ()

    @property
    def trained_share(self) -> float:
        return self.trained_params / self.total_params

    @classmethod
    def read(cls, path: pathlib.Path) -> FinetuneRun:
        return decode(cls, json.loads(path.read_text()))


@dataclasses.dataclass(frozen=True)
class FinetuneResults:
    """The fine-tuning study's ``results.json``."""

    study: str
    scale: str
    seeds: tuple[int, ...]
    bases: tuple[str, ...]
    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    recipe: dict
    runs: tuple[FinetuneRun, ...]
    comparisons: tuple[Comparison, ...]
    wall_s: float
    environment: dict = dataclasses.field(default_factory=dict)  # what wrote the file
    labels: dict = dataclasses.field(default_factory=dict)  # each method's and task's words for the tables
    checkable: tuple[str, ...] = ()  # the tasks whose exact match is reported
    kind: str = "finetune"  # tells read_results this file from a StudyResults
    schema_version: int = SCHEMA_VERSION

    def values(self, base: str, task: str, method: str, field: str) -> list:
        """``field`` of each seed's run, in the order of ``seeds``."""
        by_seed = {r.seed: r for r in self.runs if (r.base, r.task, r.method) == (base, task, method)}
        return [getattr(by_seed[s], field) for s in self.seeds]

    def write(self, path: pathlib.Path) -> None:
        write_json(path, self)


def with_holm(comparisons: Sequence[Comparison]) -> tuple[Comparison, ...]:
    """The comparisons with ``p_holm`` set over all of them."""
    adjusted = stats.holm([c.p_value for c in comparisons])
    return tuple(dataclasses.replace(c, p_holm=p) for c, p in zip(comparisons, adjusted))


def write_json(path: pathlib.Path, record) -> None:
    """A record as JSON, written whole (never a torn file)."""
    with atomic_file(path) as f:
        json.dump(dataclasses.asdict(record), f, indent=2)


def decode(cls, value):
    """A record of type ``cls`` from parsed JSON (lists back to tuples, nested records built);
    keys the record does not know are ignored, so files with fields since removed still read."""
    if value is None:
        return None
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: decode(hints[k], v) for k, v in value.items() if k in known})
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return decode(inner[0], value) if len(inner) == 1 else value
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v) for v in value)
        return tuple(decode(a, v) for a, v in zip(args, value))
    if cls is float and isinstance(value, int):
        return float(value)
    return value


def read_results(path: str | pathlib.Path) -> StudyResults | FinetuneResults:
    """A study's results.json, of this schema or of the unversioned files written before it."""
    path = pathlib.Path(path)
    raw = json.loads(path.read_text())
    if raw.get("kind") == "finetune":
        return decode(FinetuneResults, raw)
    version = raw.get("schema_version", 1)
    if version == SCHEMA_VERSION:
        return decode(StudyResults, raw)
    if version != 1:
        raise ExperimentError(f"{path}: results schema {version} is newer than this code reads ({SCHEMA_VERSION}); "
                              "update dsmoe-jax")
    if raw["experiment"] == "probes":
        return _probes_v1(raw)
    if raw["experiment"] == "sensitivity":
        return _sensitivity_v1(raw)
    return _experiment_v1(raw)


def _comparison_v1(c: dict, variant: str, metric: str = LOSS) -> Comparison:
    curve = c.get("curve")
    return Comparison.of(variant, metric, c.get("a", "deepseekmoe"), c.get("b", "gshard"), c.get("seeds", ()),
                         c["per_seed"], window_se=tuple(c.get("window_se", ())),
                         curve=decode(GapCurve, curve) if curve else None)


def _experiment_v1(raw: dict) -> StudyResults:
    seeds = tuple(raw["seeds"])
    arms = tuple(ArmResult(name, "base", a["label"], a["structure"], seeds, tuple(a["val_loss"]), a["overrides"],
                           a["params_total"], a["params_activated"], tuple(a["val_loss_stderr"]), a["eval_tokens"],
                           raw["tokens_per_arm"], tuple(a["wall_s"]), tuple(a.get("resumed", ())),
                           decode(Curve, a.get("val_curve", {})), a["paper_val_loss"])
                 for name, a in raw["arms"].items())
    measures = {k: raw[k] for k in ("specialisation", "balance") if k in raw}
    return StudyResults(raw["experiment"], raw["title"], raw["scale"], seeds, arms,
                        with_holm([_comparison_v1(c, "base") for c in raw["comparisons"]]),
                        (VariantInfo("base", "the scale unchanged", tokens_per_arm=raw["tokens_per_arm"]),),
                        measures, raw["scale_config"], raw["tokens_per_arm"], raw["wall_s"], raw["environment"]
                        if "environment" in raw else {}, tuple(raw.get("plots", ())), schema_version=1)


def _sensitivity_v1(raw: dict) -> StudyResults:
    seeds = tuple(raw["seeds"])
    arms, comparisons, variants = [], [], []
    for name, v in raw["variants"].items():
        variants.append(VariantInfo(name, v["reason"], v["scale"], dict(o.split("=", 1) for o in v["overrides"]),
                                    v.get("vocab_size", 0), v["tokens_per_arm"]))
        arms += [ArmResult(arm, name, arm, "", seeds, tuple(losses), train_tokens=v["tokens_per_arm"])
                 for arm, losses in v["val_loss"].items()]
        comparisons.append(_comparison_v1(v["deepseekmoe_minus_gshard"], name))
        comparisons += [_comparison_v1(c, name) for c in v.get("others_minus_gshard", {}).values()]
    return StudyResults("sensitivity", "DeepSeekMoE against GShard, one change of the setting at a time",
                        raw["scale"], seeds, tuple(arms), with_holm(comparisons), tuple(variants),
                        wall_s=raw["wall_s"], environment=raw["environment"], plots=tuple(raw.get("plots", ())),
                        schema_version=1)


def _probes_v1(raw: dict) -> StudyResults:
    seeds = tuple(raw["seeds"])
    comparisons, probes = [], {}
    for name, v in raw["variants"].items():
        probes[name] = v["arms"]
        comparisons += [_comparison_v1(c, name, f"loss/{kind}") for kind, c in v["deepseekmoe_minus_gshard"].items()]
    return StudyResults("probes", "evaluation-only probes of the sensitivity study's arms", raw["scale"], seeds, (),
                        with_holm(comparisons), tuple(VariantInfo(name, "") for name in raw["variants"]),
                        {"probes": probes}, environment=raw["environment"], schema_version=1)


def environment() -> dict:
    """What writes a results file (each run's own provenance is recorded where it trained)."""
    now = dataclasses.asdict(Provenance.now(resumed=False, wall_s=0.0))
    return {k: v for k, v in now.items() if k not in ("resumed", "wall_s")}
