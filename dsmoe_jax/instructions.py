"""A small instruction set built from what Python ships: the fine-tuning demo's data.

    python -m dsmoe_jax.instructions --out data/stdlib-chat        # writes train.jsonl, heldout.jsonl

Each conversation asks about public functions and methods of one standard-library module ("What does
``json.dumps(obj, *, skipkeys=False, ...)`` do?") and answers with the opening of the function's
own docstring, up to two questions a conversation. The functions are read from the source files
of the embedded corpus (``data.embedded_documents``) with ``ast``, never imported, so the set is
the same on every machine with the same Python.

The split follows the embedded corpus's, file by file (``data.split_documents``): questions about
functions of a file that the corpus holds out go to ``heldout.jsonl``, the rest to
``train.jsonl``. A model pretrained on the embedded corpus and fine-tuned on ``train.jsonl`` has
thus seen neither the text nor the answers of a held-out question. An answer repeated in several
files (``posixpath`` and ``ntpath`` share docstrings) is kept once, in the first file.
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import re

from dsmoe_jax.atomic import atomic_file
from dsmoe_jax.data import embedded_documents, split_documents

ANSWER_CHARS = 240  # an answer is the docstring's first paragraph, cut at a sentence end within this
TURNS = 1  # questions per conversation (one: short examples pack densely into the tiny model's rows)
SIGNATURE_CHARS = 60  # longer argument lists are shortened with "..."


def _module_name(document: str) -> str:
    """``stdlib:json/__init__.py`` -> ``json``; ``stdlib:os.py`` -> ``os``."""
    path = pathlib.PurePosixPath(document.removeprefix("stdlib:")).with_suffix("")
    parts = path.parts[:-1] if path.name == "__init__" else path.parts
    return ".".join(parts)


def _answer(docstring: str) -> str | None:
    """The first paragraph, whitespace collapsed, cut after the last full sentence that fits."""
    paragraph = re.sub(r"\s+", " ", docstring.strip().split("\n\n")[0]).strip()
    if len(paragraph) < 20:
        return None
    if len(paragraph) <= ANSWER_CHARS:
        return paragraph
    cut = paragraph[:ANSWER_CHARS]
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[:end + 1] if end >= 40 else None


def _signature(node: ast.FunctionDef) -> str:
    args = ast.unparse(node.args)
    return args if len(args) <= SIGNATURE_CHARS else args[:SIGNATURE_CHARS].rsplit(",", 1)[0] + ", ..."


def _public_functions(tree: ast.Module):
    """(dotted name, node) of the public top-level functions and public classes' public methods."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                    yield f"{node.name}.{item.name}", item


def questions(document: str, source: str) -> list[tuple[str, str]]:
    """(question, answer) about each public function and method of one module's source."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    module, out = _module_name(document), []
    for name, node in _public_functions(tree):
        answer = _answer(ast.get_docstring(node) or "")
        if answer:
            out.append((f"What does `{module}.{name}({_signature(node)})` do?", answer))
    return out


def conversations(documents) -> list[dict]:
    """Chat records (``{"messages": [...]}``) about the ``(name, text)`` documents' functions,
    each answer used once."""
    seen, records = set(), []
    for name, text in documents:
        if not name.startswith("stdlib:"):
            continue
        pairs = [(q, a) for q, a in questions(name, text) if a not in seen]
        seen.update(a for _, a in pairs)
        for start in range(0, len(pairs), TURNS):
            turns = []
            for question, answer in pairs[start:start + TURNS]:
                turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            records.append({"messages": turns})
    return records


def write(out: str | pathlib.Path) -> dict[str, int]:
    """Write ``train.jsonl`` and ``heldout.jsonl`` into ``out``; returns conversations per file."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_docs, held_docs = split_documents(embedded_documents())
    counts = {}
    for name, docs in (("train", train_docs), ("heldout", held_docs)):
        records = conversations(docs)
        with atomic_file(out / f"{name}.jsonl") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        counts[name] = len(records)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder for train.jsonl and heldout.jsonl")
    args = parser.parse_args(argv)
    counts = write(args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{name}.jsonl {n:,} conversations" for name, n in counts.items()))


if __name__ == "__main__":
    main()
