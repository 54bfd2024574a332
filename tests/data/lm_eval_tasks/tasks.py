"""The datasets of the local lm-eval tasks beside this file (tests/test_harness.py): JSONL read
relative to this directory, so the tasks run from any working directory and offline."""

import json
import pathlib


def load(file: str, **_) -> dict:
    """``{"test": Dataset}`` of the JSONL ``file`` beside this module (lm-eval's custom_dataset;
    it also passes the task's metadata, ignored here)."""
    import datasets

    lines = (pathlib.Path(__file__).parent / file).read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
