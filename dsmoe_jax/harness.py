"""lm-evaluation-harness over dsmoe-jax checkpoints: the ``dsmoe-jax`` model class and
``evaluate_tasks`` (``dsmoe-jax eval --tasks``).

lm-eval is an optional dependency (``pip install -e ".[eval]"``); it is imported only inside the
functions here, so the rest of the package never needs it.

Requests are scored the way lm-eval's own Hugging Face backend (``hf``) scores them, so the two
agree on the same weights (tests/test_harness.py checks it): the same split of context and
continuation into tokens (lm-eval's ``TemplateLM``), the same left truncation to the model's
``max_seq_len``, the same rolling windows, stop sequences cut on the decoded text. BOS: like a
tokenizer that adds it (DeepSeek's does, and dsmoe-jax trains with a BOS before every document),
every encoded context starts with the tokenizer's BOS unless ``add_bos_token=False``. One
deliberate difference: ``loglikelihood_rolling`` encodes the document without BOS, since its
first window is already conditioned on the BOS as the prefix token, where ``hf`` with a
BOS-adding tokenizer puts a second BOS in front.

Shapes: requests are sorted by length, cut into batches of ``batch_size`` and padded to a bucket
(lengths: powers of two from 16, capped at ``max_seq_len``; the batch: ``batch_size``, or the
power of two that holds all requests when there are fewer, the last batch padded to it too), so
jit compiles a handful of programs for a whole task, not one per request.

Shape legend: B batch, L tokens.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from dsmoe_jax import errors, inference
from dsmoe_jax.config import Config
from dsmoe_jax.loading import load_model
from dsmoe_jax.model import forward

MODEL_NAME = "dsmoe-jax"  # the name lm-eval knows the model class by (``--model dsmoe-jax``)
MIN_BUCKET = 16  # the shortest padded length: shorter buckets would only add compilations
INSTALL_HINT = 'pip install -e ".[eval]"  (or: pip install "dsmoe-jax[eval]")'

log = logging.getLogger(__name__)
# HarnessError was importable from here; errors.py holds it (until 0.4 it resolves here too)
__getattr__ = errors.moved_errors(__name__, "HarnessError")




def require_lm_eval():
    """The ``lm_eval`` module, or a ``HarnessError`` saying how to install it."""
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401  (the classes the model class derives from)
    except ImportError as e:
        raise errors.HarnessError(f"lm-evaluation-harness is not installed ({e}); install the eval extra: "
                                  f"{INSTALL_HINT}") from None
    return lm_eval


def bucket(n: int, cap: int, floor: int = 1) -> int:
    """The padded size for ``n``: the next power of two >= max(n, floor), at most ``cap``."""
    return min(cap, max(floor, 1 << max(n - 1, 0).bit_length()))


@functools.lru_cache(maxsize=8)
def _score_fn(model_cfg):
    """Jitted ``(params, tokens [B, L], targets [B, L], mask [B, L]) -> (log p(target) [B, L],
    target is the argmax [B, L])``, one per model config."""

    def score(params, tokens_BL, targets_BL, mask_BL):
        logits_BLV, _ = forward(params, tokens_BL, model_cfg, attention_mask=mask_BL)
        logits_BLV = logits_BLV.astype(jnp.float32)
        # the target's logit minus logsumexp: no second [B, L, V] array of log-probabilities
        target_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
        logp_BL = target_BL - jax.nn.logsumexp(logits_BLV, axis=-1)
        return logp_BL, jnp.argmax(logits_BLV, axis=-1) == targets_BL

    return jax.jit(score)


_generate = jax.jit(inference.generate,
                    static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "eos"))


class HarnessModel:
    """The scoring and generation behind the lm-eval model class, free of lm-eval itself.

    ``params``/``cfg``/``tokenizer`` as ``loading.load_model`` returns them. ``batch_size``: requests
    per forward pass (the largest bucket); ``max_length``: the context, at most (and by default)
    ``model.max_seq_len``; ``add_bos_token``: start encoded contexts with BOS (default: when the
    tokenizer has one); ``max_gen_toks``: generate_until's default number of new tokens."""

    def __init__(self, params: dict, cfg: Config, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
                 add_bos_token: bool | None = None, max_gen_toks: int = 256, seed: int = 0):
        self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
        limit = cfg.model.max_seq_len
        if max_length is not None and not 1 < max_length <= limit:
            raise errors.HarnessError(f"max_length={max_length}: must be from 2 to the model's max_seq_len {limit}")
        if batch_size < 1:
            raise errors.HarnessError(f"batch_size={batch_size}: must be at least 1")
        self.max_length = max_length or limit
        self.batch_size = batch_size
        self.add_bos_token = tokenizer.bos_id is not None if add_bos_token is None else bool(add_bos_token)
        if self.add_bos_token and tokenizer.bos_id is None:
            raise errors.HarnessError("add_bos_token=True, but the tokenizer has no BOS token (give the checkpoint a "
                                      "tokenizer_config.json naming bos_token, or pass add_bos_token=False)")
        self.max_gen_toks = max_gen_toks
        self.rng = jax.random.key(seed)

    # ---- tokens ------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eos_id is None:
            raise errors.HarnessError("the tokenizer has no EOS token, which lm-eval needs as the end of text; give "
                                      "the checkpoint a tokenizer_config.json naming eos_token")
        return int(self.tokenizer.eos_id)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and a rolling document's first window are conditioned on."""
        return int(self.tokenizer.bos_id) if self.tokenizer.bos_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``, with BOS in front when ``add_special_tokens`` (None: the
        ``add_bos_token`` setting) unless the string already starts with it."""
        ids = [int(i) for i in self.tokenizer.encode(string)]
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if bos and self.tokenizer.bos_id is not None and not (add_special_tokens is None and ids[:1] == [
                self.tokenizer.bos_id]):
            ids = [int(self.tokenizer.bos_id)] + ids
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    # ---- scoring -----------------------------------------------------------------------------

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], progress: bool = False
              ) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), whether greedy decoding gives the
        continuation)`` for each ``(context ids, continuation ids)``; context + continuation is
        cut to its last ``max_length + 1`` tokens (so the model reads at most ``max_length``)."""
        rows = []
        for context, continuation in pairs:
            if not continuation or not context:
                raise errors.HarnessError("a loglikelihood request needs a non-empty context and continuation (lm-eval "
                                          "puts the prefix token in front of an empty context)")
            if len(continuation) > self.max_length:
                raise errors.HarnessError(f"a continuation of {len(continuation)} tokens is longer than the model's "
                                          f"context of {self.max_length}")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], len(continuation)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first, like hf
        out: list = [None] * len(rows)
        score_fn = _score_fn(self.cfg.model)
        B = bucket(len(order), self.batch_size)  # one batch shape for every batch of the call
        for start in tqdm(range(0, len(order), self.batch_size), disable=not progress, desc="loglikelihood",
                          unit="batch"):
            chunk = order[start:start + self.batch_size]
            L = bucket(len(rows[chunk[0]][0]), self.max_length, MIN_BUCKET)
            tokens, targets, mask = (np.zeros((B, L), np.int32) for _ in range(3))
            for r, i in enumerate(chunk):  # right-padded: padding comes after, so it changes nothing causal
                n = len(rows[i][0])
                tokens[r, :n], targets[r, :n], mask[r, :n] = rows[i][0], rows[i][1], 1
            logp_BL, greedy_BL = jax.device_get(score_fn(self.params, tokens, targets, mask))
            for r, i in enumerate(chunk):
                n, c = len(rows[i][0]), rows[i][2]
                out[i] = (float(logp_BL[r, n - c:n].astype(np.float64).sum()), bool(greedy_BL[r, n - c:n].all()))
        return out

    # ---- generation --------------------------------------------------------------------------

    def generate(self, contexts: Sequence[str], max_gen_toks: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, progress: bool = False) -> list[str]:
        """Continue each context by up to ``max_gen_toks`` tokens (stopping at EOS) and decode
        them; greedy when ``temperature`` is 0. Contexts keep their last
        ``max_length - max_gen_toks`` tokens."""
        room = self.max_length - max_gen_toks
        if room < 1:
            raise errors.HarnessError(f"max_gen_toks={max_gen_toks} leaves no room for a context in the model's "
                                      f"{self.max_length} tokens; ask for fewer new tokens")
        encoded = [self.tok_encode(c)[-room:] for c in contexts]
        if any(not ids for ids in encoded):
            encoded = [ids or [self.prefix_token_id] for ids in encoded]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        eos = self.tokenizer.eos_id
        out: list = [None] * len(encoded)
        B = bucket(len(order), self.batch_size)
        for start in tqdm(range(0, len(order), self.batch_size), disable=not progress, desc="generate_until",
                          unit="batch"):
            chunk = order[start:start + self.batch_size]
            S = bucket(len(encoded[chunk[0]]), room, MIN_BUCKET)
            prompts = [encoded[i] for i in chunk] + [encoded[chunk[-1]]] * (B - len(chunk))
            ids = np.zeros((B, S), np.int32)
            mask = np.zeros((B, S), np.int32)
            for r, p in enumerate(prompts):  # left-padded: every row's next token goes to the same slot
                ids[r, S - len(p):], mask[r, S - len(p):] = p, 1
            self.rng, rng = jax.random.split(self.rng)
            new_BN = np.asarray(_generate(self.params, ids, cfg=self.cfg.model, max_new_tokens=max_gen_toks, rng=rng,
                                          temperature=float(temperature), top_k=top_k, top_p=top_p,
                                          eos=None if eos is None else int(eos), prompt_mask=mask))
            for r, i in enumerate(chunk):
                row = new_BN[r].tolist()
                if eos is not None and eos in row:
                    row = row[:row.index(eos)]
                out[i] = self.tok_decode(row)
        return out


def _batch_size(value) -> int:
    """lm-eval passes ``batch_size`` as an int, a string, or ``auto``/``auto:N``."""
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("batch_size=%s: dsmoe-jax does not search for a batch size; using 8", value)
        return 8
    try:
        return int(value)
    except (TypeError, ValueError):
        raise errors.HarnessError(f"batch_size={value!r}: expected a positive integer") from None


def _flag(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


@functools.cache
def lm_class():
    """The lm-eval model class over dsmoe-jax checkpoints, registered with lm-eval as
    ``dsmoe-jax``: after this call, ``lm_eval.simple_evaluate(model="dsmoe-jax",
    model_args="checkpoint=DIR")`` finds it in the same process (lm-eval's own command line does
    not load plugins: use ``dsmoe-jax eval --tasks``). Model arguments: ``checkpoint`` (alias
    ``pretrained``), ``step``, ``tokenizer``, ``batch_size``, ``max_length``, ``add_bos_token``,
    ``max_gen_toks``, ``seed``. It runs on one device (JAX's default)."""
    require_lm_eval()
    import lm_eval.models  # noqa: F401  (fills the registry first: get_model only fills an empty one)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

    class DsmoeLM(HarnessModel, TemplateLM):
        """lm-eval's ``TemplateLM`` over ``HarnessModel``: loglikelihood, loglikelihood_rolling
        and generate_until, batched and jitted on bucketed shapes."""

        backend = "causal"

        def __init__(self, checkpoint: str | None = None, pretrained: str | None = None, step: int | None = None,
                     tokenizer: str | None = None, batch_size=8, max_batch_size=None, device=None,
                     max_length: int | None = None, add_bos_token=None, max_gen_toks: int = 256, seed: int = 0,
                     **unknown):
            TemplateLM.__init__(self)
            if unknown:
                raise errors.HarnessError(f"unknown model arguments for {MODEL_NAME}: {sorted(unknown)}; it takes "
                                          "checkpoint, step, tokenizer, batch_size, max_length, add_bos_token, "
                                          "max_gen_toks, seed")
            directory = checkpoint or pretrained
            if not directory:
                raise errors.HarnessError(f"{MODEL_NAME} needs checkpoint=DIR: a training workdir or a converted "
                                          "checkpoint")
            del max_batch_size, device  # lm-eval passes them to every model; JAX places the params itself
            self.checkpoint = str(directory)
            params, cfg, tok = load_model(directory, None if step is None else int(step), tokenizer)
            HarnessModel.__init__(self, params, cfg, tok, batch_size=_batch_size(batch_size),
                                  max_length=None if max_length is None else int(max_length),
                                  add_bos_token=_flag(add_bos_token), max_gen_toks=int(max_gen_toks), seed=int(seed))

        @property
        def tokenizer_name(self) -> str:
            return str(self.cfg.data.tokenizer).replace("/", "__")

        def get_model_info(self) -> dict:
            return {"model_name": MODEL_NAME, "checkpoint": self.checkpoint}

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            results = self.score([(ctx, cont) for _, ctx, cont in requests], progress=not disable_tqdm)
            for (key, _, _), result in zip(requests, results):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, result)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            # Windows of max_length scored tokens, each conditioned on the tokens before it, as lm-eval
            # defines them; the document is encoded without BOS: the prefix token conditions the first.
            windows, owner = [], []
            for i, (string,) in enumerate(req.args for req in requests):
                tokens = self.tok_encode(string, add_special_tokens=False)
                for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                        token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                        context_len=1)):
                    windows.append((ctx, cont))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (logp, _) in zip(owner, self.score(windows, progress=not disable_tqdm)):
                totals[i] += logp
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            # Requests with the same generation settings run together: they share the compiled program.
            groups: dict = {}
            for i, req in enumerate(requests):
                context, gen_kwargs = req.args
                groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(i)
            # hf also stops at the EOS token's text; generate stops at the EOS token itself, and
            # decoding skips special tokens, so that text cannot appear here.
            out: list = [None] * len(requests)
            for indices in groups.values():
                gen_kwargs = dict(requests[indices[0]].args[1])
                kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
                sampling = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0.0) > 0
                texts = self.generate([requests[i].args[0] for i in indices], int(kwargs["max_gen_toks"]),
                                      temperature=float(kwargs["temperature"]) if sampling else 0.0,
                                      top_k=kwargs.get("top_k") if sampling else None,
                                      top_p=kwargs.get("top_p") if sampling else None, progress=not disable_tqdm)
                for i, text in zip(indices, texts):
                    out[i] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
            return out

    register_model(MODEL_NAME)(DsmoeLM)
    return DsmoeLM


def evaluate_tasks(checkpoint: str | os.PathLike, tasks: Sequence[str], *, limit: float | None = None,
                   batch_size: int = 8, include_path: str | Sequence[str] | None = None,
                   include_builtin: bool = True, num_fewshot: int | None = None, allow_code_execution: bool = False,
                   log_samples: bool = False, **model_args) -> dict:
    """Run lm-eval ``tasks`` (names, globs, groups or YAML files) on a checkpoint and return
    lm-eval's results dict (``results["results"]`` holds the metrics). ``include_path``:
    directories of your own task YAMLs; ``include_builtin=False`` indexes only those (lm-eval's
    15,000 built-in task files take about 15 s to index). ``limit``: at most that many documents
    per task (a fraction below 1). ``allow_code_execution``: let tasks such as HumanEval and MBPP
    run the generated code. ``model_args`` go to the model class (see ``lm_class``)."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = list(include_path) if isinstance(include_path, (list, tuple)) else include_path
    missing = [p for p in ([paths] if isinstance(paths, str) else paths or []) if not pathlib.Path(p).exists()]
    if missing:  # lm-eval would index nothing there and report the tasks as unknown
        raise errors.HarnessError(f"--include-path {missing[0]!r} does not exist; point it at the directory of your "
                                  "own task YAMLs")
    manager = TaskManager(include_path=paths, include_defaults=include_builtin)
    tasks = list(tasks)
    unknown = [t for t in tasks if not manager.match_tasks([t]) and not pathlib.Path(t).is_file()]
    if unknown:
        raise errors.HarnessError(f"unknown lm-eval tasks {unknown}; list them with `lm-eval ls tasks`, or point "
                                  "--include-path at the directory of your own task YAMLs")
    lm = lm_class()(checkpoint=str(checkpoint), batch_size=batch_size, **model_args)
    if allow_code_execution:
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")  # the code_eval metric refuses to run without it
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, log_samples=log_samples,
                                   confirm_run_unsafe_code=allow_code_execution)


def format_results(results: dict) -> str:
    """lm-eval's table of the metrics (and of the groups, if any)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text
