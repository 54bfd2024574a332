"""What the experiments are made of: scales, arms and variants, each a function from a config to
a config.

Every run is the shipped ``2b`` config (the paper's 2B setup) changed three times: by its scale
(sizes, steps, learning rate), by its arm (the FFN's structure) and by its seed; a variant of the
sensitivity experiment changes the scale and the config once more. An arm's FFN is written in
units of the dense FFN's hidden width F, as the paper writes it: 16 experts of width F, or 1
shared + 63 routed experts of width F/4, so that one arm means the same architecture at every
scale. Arms are shared between experiments (DeepSeekMoE appears in four of them) and trained once.

    config = arm_config(ARMS["deepseekmoe"], SCALES["cpu"], seed=0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from fractions import Fraction
from typing import TypeVar

from dsmoe_jax.config import Config, load_config, updated
from dsmoe_jax.errors import ConfigError, ExperimentError

BASE_CONFIG = "2b"
CURVE_POINTS = 10  # validations during each run (at most), for the loss against tokens seen

Change = Callable[[Config], Config]
T = TypeVar("T")


def unchanged(cfg: Config) -> Config:
    return cfg


def setting(**sections: dict) -> Change:
    """A change that sets keys, e.g. ``setting(moe={"aux_loss_alpha": 0.0})``."""
    return lambda cfg: updated(cfg, **sections)


@dataclasses.dataclass(frozen=True)
class Scale:
    """Model size and training budget shared by every arm at one scale."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    head_dim: int
    ffn: int  # F: the dense FFN's hidden width, the unit of every arm's FFN
    vocab_size: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    eval_tokens: int  # the final evaluation (0: the whole validation split)
    probe_tokens: int  # each specialisation probe and load measurement
    curve_tokens: int  # each of the CURVE_POINTS evaluations during training (the gap against tokens seen)
    checkpoint_every: int
    scan_layers: bool = False  # the CPU scales keep the unrolled blocks their published results used

    def apply(self, cfg: Config) -> Config:
        """``cfg`` at this scale: its sizes, budget and learning rate."""
        model = {"d_model": self.d_model, "n_layers": self.n_layers, "n_heads": self.n_heads,
                 "head_dim": self.head_dim, "d_ff": self.ffn, "vocab_size": self.vocab_size,
                 "max_seq_len": max(self.seq_len, 16), "scan_layers": self.scan_layers}
        train = {"seq_len": self.seq_len, "batch_size": self.batch_size, "steps": self.steps, "lr": self.lr,
                 "warmup_steps": self.warmup_steps, "checkpoint_every": self.checkpoint_every,
                 "eval_every": self.eval_every, "eval_tokens": self.curve_tokens,
                 "log_every": max(self.steps // 50, 1)}
        return updated(cfg, model=model, train=train)

    @property
    def eval_every(self) -> int:
        """Steps between validations during training: CURVE_POINTS of them, the last at the last
        step (fewer for a run of fewer steps)."""
        return -(-self.steps // CURVE_POINTS)

    @property
    def tokens(self) -> int:
        """Training tokens each arm sees."""
        return self.steps * self.batch_size * self.seq_len


SCALES = {
    # seconds: for tests of the machinery, not for conclusions
    "toy": Scale("toy", d_model=32, n_layers=1, n_heads=2, head_dim=16, ffn=64, vocab_size=260, seq_len=32,
                 batch_size=4, steps=6, lr=2e-3, warmup_steps=2, eval_tokens=2048, probe_tokens=1024,
                 curve_tokens=1024, checkpoint_every=3),
    # a 2-core CPU: each experiment, all arms and three seeds, in under an hour (614K tokens per arm)
    "cpu": Scale("cpu", d_model=128, n_layers=2, n_heads=4, head_dim=32, ffn=256, vocab_size=512, seq_len=128,
                 batch_size=16, steps=300, lr=2e-3, warmup_steps=30, eval_tokens=131072, probe_tokens=65536,
                 curve_tokens=16384, checkpoint_every=100),
    # the same models 10x longer (6.1M tokens per arm): hours on a 2-core CPU, resumable with --resume
    "cpu-long": Scale("cpu-long", d_model=128, n_layers=2, n_heads=4, head_dim=32, ffn=256, vocab_size=512,
                      seq_len=128, batch_size=16, steps=3000, lr=2e-3, warmup_steps=100, eval_tokens=0,
                      probe_tokens=131072, curve_tokens=32768, checkpoint_every=250),
    # the paper's 2B setup (its section 4.1): 9 layers, width 1280, 100B tokens, for a GPU mesh
    "paper": Scale("paper", d_model=1280, n_layers=9, n_heads=10, head_dim=128, ffn=3456, vocab_size=8192,
                   seq_len=2048, batch_size=2048, steps=25000, lr=1.08e-3, warmup_steps=2000, eval_tokens=0,
                   probe_tokens=2**22, curve_tokens=2**20, checkpoint_every=1000, scan_layers=True),
}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One architecture. ``routed = 0`` is a dense FFN of width ``dense_width`` x F; otherwise a
    MoE layer of ``shared`` + ``routed`` experts of width ``width`` x F, ``top_k`` routed per
    token. ``change``: what else the arm sets (balance coefficients), after its structure."""

    name: str
    label: str
    routed: int = 0
    shared: int = 0
    top_k: int = 1
    width: Fraction = Fraction(1)
    dense_width: int = 1
    routing: str = "softmax"
    top_p: float | None = None  # top-p routing's threshold (``routing = "top_p"``; top_k is then unused)
    change: Change = unchanged

    def apply(self, cfg: Config) -> Config:
        """``cfg`` (at its scale: ``model.d_ff`` is F) with this arm's FFN."""
        ffn = cfg.model.d_ff
        if self.routed == 0:
            return self.change(updated(cfg, model={"d_ff": self.dense_width * ffn,
                                                   "first_k_dense": cfg.model.n_layers}))
        expert_width = self.width * ffn
        if expert_width.denominator != 1:
            raise ConfigError(f"arm {self.name}: experts of {self.width} x F need F={ffn} divisible by "
                              f"{self.width.denominator}")
        moe = {"n_routed_experts": self.routed, "n_shared_experts": self.shared, "expert_d_ff": int(expert_width),
               "routing": self.routing, "top_p": self.top_p}
        if self.routing != "top_p":  # top-p routing leaves top_k unused
            moe["top_k"] = self.top_k
        return self.change(updated(cfg, model={"first_k_dense": 0}, moe=moe))

    def structure(self) -> str:
        """The FFN in the paper's words, e.g. "1 shared + 63 routed (F/4), top-7"."""
        if self.routed == 0:
            return "dense FFN" + (f" ({self.dense_width}F)" if self.dense_width != 1 else " (F)")
        if self.width == 1:
            width = "F"
        else:
            width = f"{float(self.width):g}F" if self.width > 1 else f"F/{self.width.denominator}"
        shared = f"{self.shared} shared + " if self.shared else ""
        hashed = ", hash" if self.routing == "hash" else ""
        chosen = f"top-p {self.top_p:g}" if self.routing == "top_p" else f"top-{self.top_k}"
        return f"{shared}{self.routed} routed ({width}), {chosen}{hashed}"


_QUARTER = Fraction(1, 4)
DYNAMIC_LOSS_WEIGHT = 1e-4  # the dynamic-routing paper's beta
GSHARD_TOP_P = 0.2
DEEPSEEKMOE_TOP_P = 0.2
ARMS = {arm.name: arm for arm in (
    # Table 1: the architectures, at equal total parameters (MoE) and the paper's activations
    Arm("dense", "Dense"),
    Arm("hash", "Hash Layer", routed=16, top_k=1, routing="hash"),
    Arm("switch", "Switch Transformer", routed=16, top_k=1),
    Arm("gshard", "GShard", routed=16, top_k=2),
    Arm("deepseekmoe", "DeepSeekMoE", routed=63, shared=1, top_k=7, width=_QUARTER),
    # Table 2: the references DeepSeekMoE is compared with
    Arm("gshard_x1.5", "GShard x1.5", routed=16, top_k=2, width=Fraction(3, 2)),
    Arm("dense_x16", "Dense x16", dense_width=16),
    # Figure 3: from GShard to DeepSeekMoE, one strategy at a time (same total and activated)
    Arm("shared_isolation", "+ shared expert isolation", routed=15, shared=1, top_k=1),
    Arm("fine_x2", "+ fine-grained segmentation (x2)", routed=31, shared=1, top_k=3, width=Fraction(1, 2)),
    # Figure 4: how many of the activated experts are shared
    Arm("shared_2", "2 shared + 62 routed", routed=62, shared=2, top_k=6, width=_QUARTER),
    Arm("shared_4", "4 shared + 60 routed", routed=60, shared=4, top_k=4, width=_QUARTER),
    # balance: DeepSeekMoE at the paper's expert-level alpha (0.01, the 2B recipe), without, at 10x,
    # and with the device-level loss over 7 groups of 9 experts (63 routed experts split evenly)
    Arm("balance_off", "no balance loss", routed=63, shared=1, top_k=7, width=_QUARTER,
        change=setting(moe={"aux_loss_alpha": 0.0})),
    Arm("balance_10x", "expert-level alpha x10", routed=63, shared=1, top_k=7, width=_QUARTER,
        change=setting(moe={"aux_loss_alpha": 0.1})),
    Arm("balance_device", "+ device-level loss (7 groups)", routed=63, shared=1, top_k=7, width=_QUARTER,
        change=setting(moe={"device_aux_alpha": 0.05, "device_groups": 7})),
    # dynamic routing (arXiv 2403.07652): each token takes the fewest experts whose router
    # probabilities pass the threshold, with the paper's entropy loss (beta 1e-4); the thresholds
    # were chosen before the study by a pilot on other seeds (EXPERIMENTS.md), for a mean at or
    # under the top-k arm's experts per token, as the paper chose 0.4 against top-2
    Arm("gshard_top_p", "GShard, top-p", routed=16, routing="top_p", top_p=GSHARD_TOP_P,
        change=setting(moe={"dynamic_loss_weight": DYNAMIC_LOSS_WEIGHT})),
    Arm("deepseekmoe_top_p", "DeepSeekMoE, top-p", routed=63, shared=1, width=_QUARTER, routing="top_p",
        top_p=DEEPSEEKMOE_TOP_P, change=setting(moe={"dynamic_loss_weight": DYNAMIC_LOSS_WEIGHT})),
    # DeepSeek-V3's FP8 training recipe (model.fp8): the projections' and experts' GEMMs in FP8
    Arm("deepseekmoe_fp8", "DeepSeekMoE, FP8 GEMMs", routed=63, shared=1, top_k=7, width=_QUARTER,
        change=setting(model={"fp8": True})),
)}




def compose(*changes: Callable[[T], T]) -> Callable[[T], T]:
    """The changes (of a config, or of a scale) applied in order."""
    def apply(value: T) -> T:
        for change in changes:
            value = change(value)
        return value

    return apply


def _scale_fields(**fields) -> Callable[[Scale], Scale]:
    return lambda scale: dataclasses.replace(scale, **fields)


def _batch_times(factor: int) -> Callable[[Scale], Scale]:
    """``factor`` times the batch at the same token budget: the steps, warmup and checkpoints
    divided by it (at a scale whose steps it divides)."""
    def apply(scale: Scale) -> Scale:
        if scale.steps % factor:
            raise ConfigError(f"{factor}x the batch at the same tokens needs steps divisible by {factor}; scale "
                              f"{scale.name} trains {scale.steps}")
        return dataclasses.replace(scale, batch_size=scale.batch_size * factor, steps=scale.steps // factor,
                                   warmup_steps=max(round(scale.warmup_steps / factor), 1),
                                   checkpoint_every=max(round(scale.checkpoint_every / factor), 1))

    return apply


def _gates_to_one(cfg: Config) -> Config:
    """Routed gates scaled by E / K: at initialisation they sum to about 1 per token."""
    if not cfg.model.n_moe_layers:
        return cfg
    moe = cfg.model.moe
    return updated(cfg, moe={"routed_scaling_factor": moe.n_routed_experts / moe.top_k})


@dataclasses.dataclass(frozen=True)
class Variant:
    """One change to the setting both compared arms train in (the ``sensitivity`` study): of the
    scale (sizes, batch, budget; the token budget must stay) and of the config, and why."""

    name: str
    reason: str
    scale: Callable[[Scale], Scale] = lambda scale: scale
    change: Change = unchanged
    vocab_size: int = 0  # > 0: a byte-level BPE tokenizer of this many tokens instead of the bytes
    excludes: tuple[str, ...] = ()  # variants it cannot be combined with

    def apply(self, arm: Arm, scale: Scale, tokenizer: str | None = None) -> tuple[Arm, Scale]:
        """The arm (named ``arm@variant``, trained and stored apart) and scale of this variant;
        ``tokenizer``: the path of the variant's BPE ``tokenizer.json`` (the runner trains it)."""
        if self.name == "base":
            return arm, scale
        change = self.change
        if self.vocab_size:
            if tokenizer is None:
                raise ConfigError(f"variant {self.name} reads a {self.vocab_size}-token BPE tokenizer: pass its path")
            change = compose(change, setting(data={"tokenizer": tokenizer}, model={"vocab_size": self.vocab_size}))
        return (dataclasses.replace(arm, name=f"{arm.name}@{self.name}", change=compose(arm.change, change)),
                self.scale_at(scale))

    def scale_at(self, scale: Scale) -> Scale:
        """``scale`` as this variant changes it; refused where the change does not apply there or
        would change the token budget (the comparison with other variants is at equal tokens)."""
        try:
            changed = self.scale(scale)
        except ConfigError as e:
            raise ConfigError(f"variant {self.name}: {e}") from None
        if changed.tokens != scale.tokens:
            raise ConfigError(f"variant {self.name} trains on {changed.tokens:,} tokens at scale {scale.name}, not "
                              f"the scale's {scale.tokens:,}: the comparison with other variants would not be at "
                              "equal tokens")
        return changed

    def applies_to(self, scale: Scale) -> bool:
        """Whether this variant can run at ``scale`` (e.g. a batch multiple needs divisible steps)."""
        try:
            self.scale_at(scale)
        except ConfigError:
            return False
        return True


SENSITIVITY_ARMS = ("gshard", "deepseekmoe")
VARIANTS = {v.name: v for v in (
    Variant("base", "the cpu setting as the architectures experiment ran it"),
    Variant("norm_topk", "gate scale: top-k weights renormalised to sum 1, where GShard's routed experts "
            "otherwise carry about 2/16 of a token's weight and DeepSeekMoE's about 7/63 beside a shared expert "
            "at weight 1", change=setting(moe={"norm_topk_prob": True}), excludes=("routed_scale",)),
    Variant("routed_scale", "gate scale without renormalising: routed gates multiplied by E/K (GShard 8, DeepSeekMoE "
            "9), so that at initialisation they sum to about 1 per token beside the shared expert's 1, while the "
            "router's confidence still scales them", change=_gates_to_one, excludes=("norm_topk",)),
    Variant("init_0.02", "initialisation: std 0.006 is the paper's for width 1280, used here at width 128",
            change=setting(model={"init_std": 0.02})),
    Variant("depth_4", "depth: with 2 blocks the router sees nearly raw embeddings", scale=_scale_fields(n_layers=4)),
    Variant("depth_8", "depth: 8 blocks, the paper's 2B setup's 9 at this width", scale=_scale_fields(n_layers=8)),
    Variant("ffn_512", "dense width F 512: fine-grained experts are 64 wide at F 256", scale=_scale_fields(ffn=512)),
    Variant("batch_64", "tokens per step: 4x the batch (64 at the cpu scales) at the same token budget (4x the "
            "assignments per expert per step)", scale=_batch_times(4)),
    Variant("lr_1e-3", "learning rate 1e-3 (the cpu setting uses 2e-3)", scale=_scale_fields(lr=1e-3)),
    Variant("lr_4e-3", "learning rate 4e-3", scale=_scale_fields(lr=4e-3)),
    Variant("warmup_100", "warmup over 100 steps (a third of the cpu scale's 300, not 30): the routers settle "
            "before the full learning rate", scale=_scale_fields(warmup_steps=100)),
    Variant("bpe_8k", "vocabulary: a byte-level BPE of 8,192 tokens trained on the training split (the paper's 2B "
            "setup uses 8K), where over 512 byte slots hash routing is a per-byte FFN; losses are then per BPE token, "
            "so only the paired gap compares with the other rows", vocab_size=8192),
)}


def variant(name: str) -> Variant:
    """A variant by name; ``a+b`` is the changes together (e.g. the winning combination), named
    in ``VARIANTS``' order whatever order they were given in. Refused: an unknown part, a part
    named twice, ``base`` in a combination (it is the setting unchanged), and parts that set
    the same value differently or exclude each other."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in VARIANTS]
    if unknown:
        raise ExperimentError(f"unknown variant {unknown[0]!r} in {name!r}; choose from {', '.join(VARIANTS)}, or join "
                          "changes other than base with '+' (e.g. norm_topk+lr_1e-3)")
    if len(parts) == 1:
        return VARIANTS[name]
    if "base" in parts:
        rest = "+".join(p for p in parts if p != "base")
        raise ExperimentError(f"variant {name!r}: base is the setting unchanged and combines with nothing; "
                              f"name {rest!r}")
    repeated = sorted({p for p in parts if parts.count(p) > 1})
    if repeated:
        raise ExperimentError(f"variant {name!r} names {repeated[0]} twice: it would train the arms of {repeated[0]!r} "
                          "again under another name")
    parts = sorted(parts, key=list(VARIANTS).index)
    chosen = [VARIANTS[p] for p in parts]
    for v in chosen:
        clash = set(v.excludes) & set(parts)
        if clash:
            raise ExperimentError(f"variant {name!r}: {v.name} and {clash.pop()} both set the gates' scale; choose one")
    vocab_sizes = {v.vocab_size for v in chosen} - {0}
    if len(vocab_sizes) > 1:
        raise ExperimentError(f"variant {name!r} names tokenizers of {sorted(vocab_sizes)} tokens: choose one")
    _check_commute(name, chosen)
    return Variant("+".join(parts), "together: " + "; ".join(v.reason for v in chosen),
                   compose(*(v.scale for v in chosen)), compose(*(v.change for v in chosen)),
                   max(vocab_sizes, default=0), tuple(x for v in chosen for x in v.excludes))


def _check_commute(name: str, chosen: list[Variant]) -> None:
    """Parts that set the same value differently do not commute: applied in the two orders (on
    DeepSeekMoE at the cpu scale), they give different settings."""
    ref_arm, ref_scale = ARMS["deepseekmoe"], SCALES["cpu"]
    for i, a in enumerate(chosen):
        for b in chosen[i + 1:]:
            ab, ba = b.scale(a.scale(ref_scale)), a.scale(b.scale(ref_scale))
            cfg = arm_config(ref_arm, ref_scale, 0)
            if ab != ba or b.change(a.change(cfg)) != a.change(b.change(cfg)):
                raise ExperimentError(f"variant {name!r}: {a.name} and {b.name} set the same value differently; "
                                  "choose one")


def arm_config(arm: Arm, scale: Scale, seed: int) -> Config:
    """The full config of one arm at one scale and seed."""
    return updated(arm.apply(scale.apply(load_config(BASE_CONFIG))), train={"seed": seed})


def config_diff(base: Config, changed: Config) -> dict[str, object]:
    """``{section.key: value}`` of ``changed`` where it differs from ``base`` (what an arm sets)."""
    a, b = base.to_dict(), changed.to_dict()
    return {f"{section}.{key}": value for section, table in b.items() for key, value in table.items()
            if a.get(section, {}).get(key) != value}


def arm_settings(arm: Arm, scale: Scale) -> dict[str, object]:
    """What the arm sets on top of its scale: what differs between arms."""
    base = scale.apply(load_config(BASE_CONFIG))
    return config_diff(base, arm.apply(base))
