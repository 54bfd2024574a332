"""Expert-specialised fine-tuning (ESFT; Wang et al. 2024, "Let the Expert Stick to His Last",
arXiv 2407.01906): how much a task uses each routed expert, which experts to train, and
DeepSeek's ``expert_cfg.json``.

Relevance of routed expert e in MoE layer l, over the N scored tokens t of the task's data (the
answer tokens of chat data, every token of text):

    gate   r_le = mean_t g_le,t            g_le,t: t's gate for e, 0 where e is not in t's top-K
    token  r_le = mean_t 1(e in top-K(t)) / K

each then normalised within its layer to sum to 1, so that ``top_p`` reads as a share of the
layer's routing. Selection, per layer: the experts by relevance (ties: the lower id first), the
fewest whose cumulative relevance reaches ``top_p``, the expert that crosses it included (the
paper uses 0.1 for gate scores, 0.2 for token scores).

DeepSeek's released scorer differs: it pools the tokens of all samples (the paper averages per
sample, then over samples; pooling is what this module does too), and its normalisation divides
each expert's total by its sum over layers, not over the layer's experts, while the score files
and expert configs it ships match a per-layer normalisation (its token-score files sum to 1 per
layer). Layer keys of ``expert_cfg.json`` are absolute decoder-layer indices, as DeepSeek's.

Shape legend: L MoE layers, E routed experts, K experts per token, B batch, S sequence, T tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dsmoe_jax.atomic import atomic_file
from dsmoe_jax.config import Config, ModelConfig, model_config, updated
from dsmoe_jax.data import load_tokens, row_source
from dsmoe_jax.errors import ConfigError
from dsmoe_jax.loading import load_model
from dsmoe_jax.model import forward
from dsmoe_jax.moe import RouteOptions
from dsmoe_jax.packing import Packed, row_tokens

SCORES = ("gate", "token")
DEFAULT_TOP_P = {"gate": 0.1, "token": 0.2}  # the paper's thresholds
EXPERT_CFG = "expert_cfg.json"


def moe_layers(cfg: Config | ModelConfig) -> list[int]:
    """The absolute decoder-layer indices of the MoE layers, in order."""
    m = model_config(cfg)
    return list(m.moe_layers) if m.moe is not None else []


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    """Which parameters ESFT trains: per MoE layer (absolute index) the routed experts; the
    shared experts and everything outside the experts only when their flags say so."""

    experts: Mapping[int, tuple[int, ...]]
    shared_experts: bool = False
    non_expert_modules: bool = False

    def to_json(self) -> dict:
        """DeepSeek's format: layer keys as strings, expert ids as lists."""
        return {"experts": {str(layer): list(ids) for layer, ids in sorted(self.experts.items())},
                "shared_experts": self.shared_experts, "non_expert_modules": self.non_expert_modules}

    def write(self, path: str | pathlib.Path) -> None:
        with atomic_file(pathlib.Path(path)) as f:
            json.dump(self.to_json(), f, indent=2)

    @classmethod
    def read(cls, path: str | pathlib.Path, cfg: Config | ModelConfig) -> ExpertConfig:
        """``expert_cfg.json`` (DeepSeek's format), checked against the model it trains."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / EXPERT_CFG
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} does not exist: write one with `dsmoe-jax esft-score`") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(raw, cfg, str(path))

    @classmethod
    def from_json(cls, raw: dict, cfg: Config | ModelConfig, where: str = "expert_cfg") -> ExpertConfig:
        unknown = set(raw) - {"experts", "shared_experts", "non_expert_modules"}
        if unknown or not isinstance(raw.get("experts"), dict):
            extra = f"; unknown keys {sorted(unknown)}" if unknown else ""
            raise ConfigError(f"{where}: expected {{'experts': {{layer: [expert ids]}}, 'shared_experts': bool, "
                              f"'non_expert_modules': bool}}{extra}")
        m, layers = model_config(cfg), moe_layers(cfg)
        experts = {}
        for key, ids in raw["experts"].items():
            if not str(key).lstrip("-").isdigit() or int(key) not in layers:
                raise ConfigError(f"{where}: layer {key!r} is not an MoE layer of this model (its MoE layers are "
                                  f"{layers[0]}..{layers[-1]}, absolute decoder-layer indices)" if layers else
                                  f"{where}: this model has no MoE layer")
            bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < m.moe.n_routed_experts]
            if bad:
                E = m.moe.n_routed_experts
                raise ConfigError(f"{where}: layer {key}: expert {bad[0]!r} is out of range; this model has {E} "
                                  f"routed experts per layer (ids 0..{E - 1})")
            if len(set(ids)) < len(ids):
                raise ConfigError(f"{where}: layer {key} names an expert twice")
            experts[int(key)] = tuple(ids)
        for flag in ("shared_experts", "non_expert_modules"):
            if not isinstance(raw.get(flag, False), bool):
                raise ConfigError(f"{where}: {flag} must be true or false")
        return cls(experts, raw.get("shared_experts", False), raw.get("non_expert_modules", False))


@functools.lru_cache(maxsize=8)
def _score_step(cfg: ModelConfig):
    E = cfg.moe.n_routed_experts

    def step(params, tokens_BS, segments_BS, counted_BS):
        aux = forward(params, tokens_BS, cfg, route=RouteOptions(record=True), segment_ids=segments_BS)[1]
        expert_LTK, gate_LTK = aux.expert_choices, aux.expert_gates
        L, T, K = expert_LTK.shape
        counted_LTK = jnp.broadcast_to(counted_BS.reshape(1, T, 1), (L, T, K)).astype(jnp.float32)
        layer_LTK = jnp.broadcast_to(jnp.arange(L)[:, None, None], (L, T, K))
        gate_LE = jnp.zeros((L, E), jnp.float32).at[layer_LTK, expert_LTK].add(gate_LTK * counted_LTK)
        token_LE = jnp.zeros((L, E), jnp.float32).at[layer_LTK, expert_LTK].add(counted_LTK / K)
        return gate_LE, token_LE, jnp.sum(counted_BS)

    return jax.jit(step)


def relevance(params, cfg: Config | ModelConfig, rows: Iterable) -> dict[str, np.ndarray]:
    """Each MoE layer's routed experts' relevance ``[L, E]`` by ``gate`` and by ``token`` score
    (normalised within each layer), over ``rows``: batches of windows ``[B, S + 1]`` (every input
    token counts) or ``Packed`` rows (the answer tokens count), and ``tokens``, the count."""
    m = model_config(cfg)
    if m.moe is None or not moe_layers(m):
        raise ConfigError("ESFT scores routed experts, and this model has no MoE layer")
    if m.moe.routing == "hash":
        raise ConfigError("ESFT scores a learned router's choices; hash routing has no gates to score")
    step = _score_step(m)
    gate, token, n = 0.0, 0.0, 0.0
    for batch in rows:
        tokens_BS1, segments_BS = row_tokens(batch)
        counted_BS = (np.asarray(batch.loss_mask)[:, :-1] > 0) if isinstance(batch, Packed) \
            else np.ones(tokens_BS1[:, :-1].shape, bool)
        segments = None if segments_BS is None else jnp.asarray(segments_BS)
        g, t, c = step(params, jnp.asarray(tokens_BS1[:, :-1]), segments, jnp.asarray(counted_BS))
        gate, token, n = gate + np.asarray(g, np.float64), token + np.asarray(t, np.float64), n + float(c)
    if n == 0:
        raise ConfigError("no token to score: the data holds no answer token (chat data) or no window")
    normalise = lambda a_LE: a_LE / np.maximum(a_LE.sum(-1, keepdims=True), 1e-30)
    return {"gate": normalise(gate / n), "token": normalise(token / n), "tokens": int(n)}


def select(relevance_LE: np.ndarray, top_p: float, layers: list[int]) -> ExpertConfig:
    """Per layer, the fewest experts whose cumulative relevance reaches ``top_p`` (the one that
    crosses it included; ties: the lower id first), for MoE layers ``layers`` (absolute indices)."""
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
    chosen = {}
    for layer, r_E in zip(layers, np.asarray(relevance_LE)):
        order = np.argsort(-r_E, kind="stable")  # stable: equal scores keep the lower id first
        reached = np.cumsum(r_E[order]) >= top_p - 1e-12
        count = int(np.argmax(reached)) + 1 if reached.any() else len(order)
        chosen[layer] = tuple(int(e) for e in order[:count])
    return ExpertConfig(chosen)


def select_count(relevance_LE: np.ndarray, count: int, layers: list[int]) -> ExpertConfig:
    """Per layer, the ``count`` most relevant experts (ties: the lower id first): a fixed budget
    of trained parameters per layer, where ``select`` takes as many as the scores ask for."""
    E = np.shape(relevance_LE)[-1]
    if not 1 <= count <= E:
        raise ConfigError(f"choose between 1 and the layer's {E} routed experts, got {count}")
    return ExpertConfig({layer: tuple(int(e) for e in np.argsort(-r_E, kind="stable")[:count])
                         for layer, r_E in zip(layers, np.asarray(relevance_LE))})


def task_rows(split, seq_len: int, tokens: int, batch_size: int, seed: int = 0):
    """Batches of rows of ``split`` (``data.row_source``'s windows, or chat examples packed with
    their answer mask) in a fixed random order, until they hold ``tokens`` scored tokens (all of
    them when the split has fewer)."""
    source = row_source(split, seq_len)
    order = np.random.default_rng(seed).permutation(len(source))
    seen, start = 0, 0
    while seen < tokens and start < len(order):
        rows = [source[int(i)] for i in order[start:start + batch_size]]
        start += batch_size
        if isinstance(rows[0], Packed):
            batch = Packed(*map(np.stack, zip(*rows)))
            seen += int((batch.loss_mask[:, :-1] > 0).sum())
        else:
            batch = np.stack(rows)
            seen += batch[:, :-1].size
        yield batch


def plot_relevance(scores: dict, layers: list[int], path: pathlib.Path) -> bool:
    """The layer x expert heat maps of both scores as a PNG; False (nothing written) without
    matplotlib (``pip install 'dsmoe-jax[experiments]'``)."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.3 * len(layers)), squeeze=False)
    for ax, score in zip(axes[0], SCORES):
        image = ax.imshow(np.asarray(scores[score]), aspect="auto", cmap="viridis")
        ax.set_title(f"ESFT-{score.capitalize()} relevance (each layer sums to 1)")
        ax.set_xlabel("routed expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def score_task(checkpoint: str | pathlib.Path, data_path: str, out: str | pathlib.Path, *, tokens: int = 131_072,
               score: str = "token", top_p: float | None = None, batch_size: int | None = None,
               seq_len: int | None = None) -> ExpertConfig:
    """``dsmoe-jax esft-score``: both relevance scores of ``checkpoint``'s routed experts on
    ``tokens`` sampled tokens of ``data_path`` (anything ``data.path`` takes; the training split;
    chat data's answer tokens), written to ``out/scores.json`` with their heat map
    (``relevance.png``), and the experts ``score`` selects at ``top_p`` (default the paper's) in
    ``out/expert_cfg.json``, which ``train.trainable = "esft:OUT/expert_cfg.json"`` trains.
    Rows of ``seq_len`` tokens (default: the checkpoint's ``train.seq_len``), as fine-tuning reads them."""
    if score not in SCORES:
        raise ConfigError(f"--score {score!r}: choose gate or token")
    top_p = DEFAULT_TOP_P[score] if top_p is None else top_p
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p {top_p}: expected a share of each layer's relevance in (0, 1]")
    if tokens < 1:
        raise ConfigError(f"--tokens {tokens}: score at least one token")
    model = load_model(checkpoint)
    cfg = updated(model.cfg, data={"path": str(data_path), "document_mask": False})
    if seq_len:
        cfg = updated(cfg, train={"seq_len": seq_len}, model={"max_seq_len": max(seq_len, cfg.model.max_seq_len)})
    train_split, _, _ = load_tokens(cfg, checkpoint=str(checkpoint))
    rows = task_rows(train_split, cfg.train.seq_len, tokens, batch_size or cfg.train.batch_size)
    scores = relevance(model.params, cfg, rows)
    layers = moe_layers(cfg)
    chosen = select(scores[score], top_p, layers)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "scores.json") as f:
        json.dump({"checkpoint": str(checkpoint), "data": str(data_path), "tokens": scores["tokens"],
                   "layers": layers, "normalisation": "within each layer: each layer's experts sum to 1",
                   **{s: np.round(scores[s], 6).tolist() for s in SCORES}}, f, indent=1)
    chosen.write(out / EXPERT_CFG)
    plot_relevance(scores, layers, out / "relevance.png")
    return chosen
