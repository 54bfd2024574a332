"""Every error the project raises for a problem a user can fix, in one place.

The command line reports a ``DsmoeError`` as one line without a traceback and exits with its
``exit_code``: 2 for configuration and usage errors (``ConfigError``, ``InputError``), 128 + the
signal for a stopped run (``TrainingInterrupted``), 1 for the rest (README's Troubleshooting
table). Each class says where it comes from; the modules that raise them import them from here.
"""

from __future__ import annotations


class DsmoeError(Exception):
    """A problem with the user's input or run: reported by the CLI as one line, no traceback."""

    exit_code = 1


class ConfigError(DsmoeError, ValueError):
    """A config file, override, option or mesh that cannot describe a valid run (config.py and the
    checks across sections)."""

    exit_code = 2


class InputError(DsmoeError, ValueError):
    """Arguments the model cannot run as given: token ids, lengths, sampling settings (model.py,
    inference.py)."""

    exit_code = 2


class DataError(DsmoeError, ValueError):
    """Data that cannot be read or does not fit the model (tokenizer.py, shards.py, data.py, prepare.py)."""


class OutputExistsError(DsmoeError, FileExistsError):
    """An output directory that already holds something: it is never overwritten (atomic.py)."""


class OutputLockedError(DsmoeError, RuntimeError):
    """An output directory another live process is writing (lock.py): one writer per directory."""


class CheckpointError(DsmoeError, RuntimeError):
    """A workdir or checkpoint that cannot be used as asked (checkpoint.py, train/checkpoint.py)."""


class ConversionError(DsmoeError, ValueError):
    """A checkpoint that does not match its config, or an output that cannot be written (convert/)."""


class HarnessError(DsmoeError, ValueError):
    """lm-eval is missing, or a request, task or model argument cannot be evaluated (harness.py)."""


class ExperimentError(DsmoeError, RuntimeError):
    """An experiment that cannot run as asked: an unknown name, a workdir of another config
    (experiments/)."""


class TrainingError(DsmoeError, RuntimeError):
    """The run cannot go on: a non-finite loss, a batch that does not fit in memory (train/)."""


class TrainingInterrupted(DsmoeError, RuntimeError):
    """SIGINT or SIGTERM stopped the run after a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
