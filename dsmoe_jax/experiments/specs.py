"""The paper's experiments as data: scales, arms and which arms each experiment compares.

Every arm is the shipped ``2b`` config (the paper's 2B setup) plus overrides: first the scale's
(sizes, steps, learning rate), then the arm's own (the FFN's structure), then the seed. An
arm's FFN is written in units of the dense FFN's hidden width F, as the paper writes it: 16
experts of width F, or 1 shared + 63 routed experts of width F/4, so that one arm means the
same architecture at every scale. Arms are shared between experiments (DeepSeekMoE appears in
four of them) and trained once.

    config = arm_config(ARMS["deepseekmoe"], SCALES["cpu"], seed=0)
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

from dsmoe_jax.config import Config, ConfigError, load_config

BASE_CONFIG = "2b"
CURVE_POINTS = 10  # validations during each run (at most), for the loss against tokens seen


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

    def overrides(self) -> list[str]:
        return [
            f"model.d_model={self.d_model}", f"model.n_layers={self.n_layers}", f"model.n_heads={self.n_heads}",
            f"model.head_dim={self.head_dim}", f"model.d_ff={self.ffn}", f"model.vocab_size={self.vocab_size}",
            f"model.max_seq_len={max(self.seq_len, 16)}", f"train.seq_len={self.seq_len}",
            f"train.batch_size={self.batch_size}", f"train.steps={self.steps}", f"train.lr={self.lr}",
            f"train.warmup_steps={self.warmup_steps}", f"train.checkpoint_every={self.checkpoint_every}",
            f"train.eval_every={self.eval_every}", f"train.eval_tokens={self.curve_tokens}",
            f"train.log_every={max(self.steps // 50, 1)}", f"model.scan_layers={str(self.scan_layers).lower()}",
        ]

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
    token. ``settings`` are further ``section.key=value`` overrides (balance coefficients)."""

    name: str
    label: str
    routed: int = 0
    shared: int = 0
    top_k: int = 1
    width: Fraction = Fraction(1)
    dense_width: int = 1
    routing: str = "softmax"
    settings: tuple[str, ...] = ()

    def overrides(self, scale: Scale) -> list[str]:
        if self.routed == 0:
            return [f"model.d_ff={self.dense_width * scale.ffn}", f"model.first_k_dense={scale.n_layers}",
                    *self.settings]
        expert_width = self.width * scale.ffn
        if expert_width.denominator != 1:
            raise ConfigError(f"arm {self.name}: experts of {self.width} x F need F={scale.ffn} divisible by "
                              f"{self.width.denominator}")
        return [f"moe.n_routed_experts={self.routed}", f"moe.n_shared_experts={self.shared}",
                f"moe.top_k={self.top_k}", f"moe.expert_d_ff={int(expert_width)}", f"moe.routing={self.routing}",
                "model.first_k_dense=0", *self.settings]

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
        return f"{shared}{self.routed} routed ({width}), top-{self.top_k}{hashed}"


_QUARTER = Fraction(1, 4)
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
        settings=("moe.aux_loss_alpha=0.0",)),
    Arm("balance_10x", "expert-level alpha x10", routed=63, shared=1, top_k=7, width=_QUARTER,
        settings=("moe.aux_loss_alpha=0.1",)),
    Arm("balance_device", "+ device-level loss (7 groups)", routed=63, shared=1, top_k=7, width=_QUARTER,
        settings=("moe.device_aux_alpha=0.05", "moe.device_groups=7")),
)}


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    title: str  # the paper's table or figure
    arms: tuple[str, ...]
    paper: dict[str, float] = dataclasses.field(default_factory=dict)  # the paper's Pile loss per arm
    measure: str | None = None  # what else is measured on the trained arms: "specialisation" | "balance"


EXPERIMENTS = {e.name: e for e in (
    Experiment("architectures", "Table 1: DeepSeekMoE against Dense, Hash, Switch and GShard (plus Table 2's "
               "GShard x1.5 and Dense x16)",
               ("dense", "hash", "switch", "gshard", "deepseekmoe", "gshard_x1.5", "dense_x16"),
               paper={"dense": 2.060, "hash": 1.932, "switch": 1.881, "gshard": 1.867, "deepseekmoe": 1.808}),
    Experiment("ablation", "Figure 3: shared-expert isolation and fine-grained segmentation, one at a time",
               ("gshard", "shared_isolation", "fine_x2", "deepseekmoe")),
    Experiment("shared-ratio", "Figure 4: the ratio of shared to routed experts",
               ("deepseekmoe", "shared_2", "shared_4")),
    Experiment("specialisation", "Section 4.5: expert redundancy, the shared expert, fewer activated experts",
               ("deepseekmoe", "gshard", "gshard_x1.5"), measure="specialisation"),
    Experiment("balance", "Expert and device load with the balance losses off, at the paper's alpha and at 10x",
               ("balance_off", "deepseekmoe", "balance_10x", "balance_device"), measure="balance"),
)}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One change to the setting of GShard and DeepSeekMoE (the ``sensitivity`` experiment):
    fields of the scale (sizes, batch, budget) and/or overrides both arms take, and why."""

    name: str
    reason: str
    scale: dict = dataclasses.field(default_factory=dict)  # Scale fields to replace
    overrides: tuple[str, ...] = ()
    vocab_size: int = 0  # > 0: a byte-level BPE tokenizer of this many tokens instead of the bytes
    gates_to_one: bool = False  # routed gates scaled by E / K: about 1 per token at initialisation

    def apply(self, arm: Arm, scale: Scale, tokenizer: str | None = None) -> tuple[Arm, Scale]:
        """The arm (named ``arm@variant``, trained and stored apart) and scale of this variant;
        ``tokenizer``: the path of the variant's BPE ``tokenizer.json`` (the runner trains it)."""
        if self.name == "base":
            return arm, scale
        overrides = self.overrides
        if self.vocab_size:
            if tokenizer is None:
                raise ConfigError(f"variant {self.name} reads a {self.vocab_size}-token BPE tokenizer: pass its path")
            overrides += (f"data.tokenizer='{tokenizer}'", f"model.vocab_size={self.vocab_size}")
        if self.gates_to_one and arm.routed:
            overrides += (f"moe.routed_scaling_factor={arm.routed / arm.top_k:g}",)
        return (dataclasses.replace(arm, name=f"{arm.name}@{self.name}", settings=arm.settings + overrides),
                dataclasses.replace(scale, **self.scale))


SENSITIVITY_ARMS = ("gshard", "deepseekmoe")
VARIANTS = {v.name: v for v in (
    Variant("base", "the cpu setting as the architectures experiment ran it"),
    Variant("norm_topk", "gate scale: top-k weights renormalised to sum 1, where GShard's routed experts "
            "otherwise carry about 2/16 of a token's weight and DeepSeekMoE's about 7/63 beside a shared expert "
            "at weight 1", overrides=("moe.norm_topk_prob=true",)),
    Variant("routed_scale", "gate scale without renormalising: routed gates multiplied by E/K (GShard 8, DeepSeekMoE "
            "9), so that at initialisation they sum to about 1 per token beside the shared expert's 1, while the "
            "router's confidence still scales them", gates_to_one=True),
    Variant("init_0.02", "initialisation: std 0.006 is the paper's for width 1280, used here at width 128",
            overrides=("model.init_std=0.02",)),
    Variant("depth_4", "depth: with 2 blocks the router sees nearly raw embeddings", scale={"n_layers": 4}),
    Variant("depth_8", "depth: 8 blocks, the paper's 2B setup's 9 at this width", scale={"n_layers": 8}),
    Variant("ffn_512", "dense width F 512: fine-grained experts are 64 wide at F 256", scale={"ffn": 512}),
    Variant("batch_64", "tokens per step: batch 64 at the same token budget (4x the assignments per expert "
            "per step)", scale={"batch_size": 64, "steps": 75, "warmup_steps": 8, "checkpoint_every": 25}),
    Variant("lr_1e-3", "learning rate 1e-3 (the cpu setting uses 2e-3)", scale={"lr": 1e-3}),
    Variant("lr_4e-3", "learning rate 4e-3", scale={"lr": 4e-3}),
    Variant("warmup_100", "warmup over a third of the steps (100 of 300, not 30): the routers settle before the "
            "full learning rate", scale={"warmup_steps": 100}),
    Variant("bpe_8k", "vocabulary: a byte-level BPE of 8,192 tokens trained on the training split (the paper's 2B "
            "setup uses 8K), where over 512 byte slots hash routing is a per-byte FFN; losses are then per BPE token, "
            "so only the paired gap compares with the other rows", vocab_size=8192),
)}


def variant(name: str) -> Variant:
    """A variant by name; ``a+b`` is the two changes together (the winning combination), which
    must not set the same field of the scale or the same override key differently."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in VARIANTS or (p == "base" and len(parts) > 1)]
    if unknown:
        raise ConfigError(f"unknown variant {unknown[0]!r} in {name!r}; choose from {', '.join(VARIANTS)}, "
                          "or join changes with '+' (e.g. norm_topk+lr_1e-3)")
    if len(parts) == 1:
        return VARIANTS[name]
    scale: dict = {}
    overrides: dict[str, str] = {}
    vocab_sizes = {VARIANTS[p].vocab_size for p in parts} - {0}
    if len(vocab_sizes) > 1:
        raise ConfigError(f"variant {name!r} names tokenizers of {sorted(vocab_sizes)} tokens: choose one")
    for part in parts:
        v = VARIANTS[part]
        items = [*v.scale.items(), *(o.split("=", 1) for o in v.overrides)]
        for key, value in items:
            seen = scale if key in v.scale else overrides
            if key in seen and seen[key] != value:
                raise ConfigError(f"variant {name!r}: {part} sets {key}={value} but an earlier part set "
                                  f"{key}={seen[key]}")
            seen[key] = value
    gates_to_one = any(VARIANTS[p].gates_to_one for p in parts)
    if gates_to_one and overrides.get("moe.norm_topk_prob") == "true":
        raise ConfigError(f"variant {name!r}: renormalised gates already sum to 1; scaling them by E/K too would "
                          "make them sum to E/K. Choose one of norm_topk and routed_scale")
    return Variant(name, "together: " + "; ".join(VARIANTS[p].reason for p in parts), scale,
                   tuple(f"{k}={v}" for k, v in overrides.items()), max(vocab_sizes, default=0), gates_to_one)


def arm_config(arm: Arm, scale: Scale, seed: int) -> Config:
    """The full config of one arm at one scale and seed."""
    return load_config(BASE_CONFIG, [*scale.overrides(), *arm.overrides(scale), f"train.seed={seed}"])


def overrides_dict(arm: Arm, scale: Scale) -> dict[str, object]:
    """The arm's own overrides as ``{section.key: value}``: what differs between arms."""
    return dict(item.split("=", 1) for item in arm.overrides(scale))
