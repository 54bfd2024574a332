"""A trained model ready for use: its params and config from a checkpoint, with the tokenizer it
was trained with, and the validation tokens its loss is taken on. ``dsmoe-jax generate``,
``eval`` (loss and lm-eval tasks) and the experiments all load through here.

    model = load_model("runs/tiny")              # a training workdir or a converted checkpoint
    ids = model.tokenizer.encode("def main(")
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import NamedTuple

from dsmoe_jax import data
from dsmoe_jax.checkpoint import load_checkpoint
from dsmoe_jax.config import Config
from dsmoe_jax.tokenizer import Tokenizer, check_tokenizer, load_tokenizer


class LoadedModel(NamedTuple):
    params: dict
    cfg: Config  # the run's config; ``data.tokenizer`` names the tokenizer below
    tokenizer: Tokenizer


def load_model(checkpoint: str | os.PathLike, step: int | None = None, tokenizer: str | None = None) -> LoadedModel:
    """The model of a training workdir or converted checkpoint, with its tokenizer: ``tokenizer``
    if given, else a ``tokenizer.json`` beside the checkpoint (a converted one), else the run's
    ``data.tokenizer``; one that does not fit the model is refused (``DataError``)."""
    params, cfg = load_checkpoint(checkpoint, step=step)
    beside = pathlib.Path(checkpoint) / "tokenizer.json"
    spec = tokenizer or (str(beside) if beside.is_file() else None)
    if spec:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=spec))
    tok = load_tokenizer(cfg.data.tokenizer)
    check_tokenizer(tok, cfg, checkpoint=str(checkpoint))
    return LoadedModel(params, cfg, tok)


def validation_tokens(cfg: Config, checkpoint: str | os.PathLike | None = None) -> data.TokenSequence:
    """The held-out tokens of ``cfg.data`` that the model's loss is taken on."""
    return data.load_tokens(cfg, checkpoint=None if checkpoint is None else str(checkpoint))[1]
