"""The fine-tuning study's tasks: chat data written as ``train.jsonl`` and ``heldout.jsonl``, split
as the embedded corpus is split, so that a held-out example was seen neither in pretraining nor in
fine-tuning.

- ``instructions``: questions about standard-library functions answered from their docstrings
  (``dsmoe_jax.instructions``, the fine-tuning demo): knowledge and the form of an answer; the
  answers are free text, scored by their loss only.
- ``capitals``: "Write `ast_node_name` in capital letters." -> "AST_NODE_NAME", over the
  lower-case function names of the corpus's source files: a transformation of the question's
  own text, checkable by exact match.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Callable

from dsmoe_jax import instructions
from dsmoe_jax.atomic import atomic_file
from dsmoe_jax.data import embedded_documents, split_documents
from dsmoe_jax.prepare import Options, prepare

_NAME = re.compile(r"^\s*def ([a-z][a-z0-9_]{3,23})\(", re.MULTILINE)


def capitals_question(name: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Write `{name}` in capital letters."},
                         {"role": "assistant", "content": name.upper()}]}


def _names(documents) -> list[str]:
    """The distinct lower-case function names the source documents define, in the order met."""
    names = {}
    for doc, text in documents:
        if doc.startswith("stdlib:") and doc.endswith(".py"):
            names.update(dict.fromkeys(_NAME.findall(text)))
    return list(names)


def capitals(train_docs, held_docs) -> tuple[list[dict], list[dict]]:
    """(training, held-out) conversations, one per name: a name defined in a held-out file and
    in no training file is a held-out question (2,605 and 168 of them)."""
    train_names = _names(train_docs)
    seen = set(train_names)
    return ([capitals_question(n) for n in train_names],
            [capitals_question(n) for n in _names(held_docs) if n not in seen])


def _instructions(train_docs, held_docs) -> tuple[list[dict], list[dict]]:
    return instructions.conversations(train_docs), instructions.conversations(held_docs)


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    title: str
    conversations: Callable  # (training documents, held-out documents) -> (training, held-out) conversations
    checkable: bool  # exact match means something (one right answer)

    def write(self, out: pathlib.Path, progress: bool = False) -> pathlib.Path:
        """``out/train.jsonl``, ``out/heldout.jsonl`` and ``out/train`` (the training file
        prepared as chat data, every 20th conversation its validation split); returns the
        prepared directory. Written once: a later call reads what is there."""
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "heldout.jsonl").is_file():
            splits = self.conversations(*split_documents(embedded_documents()))
            for name, records in zip(("train", "heldout"), splits):
                with atomic_file(out / f"{name}.jsonl") as f:
                    f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        prepare([str(out / "train.jsonl")], out / "train", Options(format="chat"), workers=1, progress=progress)
        return out / "train"

    def heldout(self, out: pathlib.Path) -> list[dict]:
        """The held-out conversations ``write`` wrote."""
        return [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]


TASKS = {t.name: t for t in (
    Task("instructions", "questions about standard-library functions, answered from their docstrings",
         _instructions, checkable=False),
    Task("capitals", "a function name written in capital letters", capitals, checkable=True),
)}
