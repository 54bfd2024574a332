"""Every error the project raises for a problem a user can fix, in one place, with its exit code.

The command line reports each as one line without a traceback and exits with the class's
``exit_code``; this is the one table of them (README's Troubleshooting section lists the same):

    1    not one of these: a bug, reported with its traceback (Python's own code for it)
    2    usage: the command, config or arguments ask for what cannot run (``ConfigError``,
         ``InputError``, ``ExperimentError``, ``HarnessError``; argparse's own refusals)
    3    data that cannot be read or does not fit the model (``DataError``)
    4    a checkpoint or workdir that cannot be used as asked (``CheckpointError``, ``ConversionError``)
    5    an output that already exists (``OutputExistsError``)
    6    an output another live process is writing (``OutputLockedError``)
    7    a training run that cannot go on (``TrainingError``)
    8    the system refused a read or write: a full or read-only disk, a missing permission or path
         (``StorageError``; the command line reports every ``OSError`` as one)
    128 + N  stopped by signal N (``TrainingInterrupted``; Ctrl-C elsewhere: 130)

Each class says where it comes from; the modules that raise them import them from here.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import warnings


class DsmoeError(Exception):
    """A problem with the user's input or run: reported by the CLI as one line, no traceback."""

    exit_code = 1  # each subclass sets its kind's code: 1 is left to bugs


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

    exit_code = 3


class OutputExistsError(DsmoeError, FileExistsError):
    """An output directory that already holds something: it is never overwritten (atomic.py)."""

    exit_code = 5


class OutputLockedError(DsmoeError, RuntimeError):
    """An output directory another live process is writing (lock.py): one writer per directory."""

    exit_code = 6


class CheckpointError(DsmoeError, RuntimeError):
    """A workdir or checkpoint that cannot be used as asked (checkpoint.py, train/checkpoint.py)."""

    exit_code = 4


class ConversionError(DsmoeError, ValueError):
    """A checkpoint that does not match its config, or an output that cannot be written (convert/)."""

    exit_code = 4


class HarnessError(DsmoeError, ValueError):
    """lm-eval is missing, or a request, task or model argument cannot be evaluated (harness.py)."""

    exit_code = 2


class ExperimentError(DsmoeError, RuntimeError):
    """An experiment that cannot run as asked: an unknown name, a workdir of another config
    (experiments/)."""

    exit_code = 2  # an unknown experiment is refused as an unknown variant or arm is (ConfigError)


class TrainingError(DsmoeError, RuntimeError):
    """The run cannot go on: a non-finite loss, a batch that does not fit in memory, a stopped peer (train/)."""

    exit_code = 7


class TrainingInterrupted(DsmoeError, RuntimeError):
    """SIGINT or SIGTERM stopped the run after a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StorageError(DsmoeError, OSError):
    """A read or write the system refused: a full or read-only disk, a missing permission or path
    (``storage_error`` words it; the command line turns every ``OSError`` into one)."""

    exit_code = 8


WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})  # errors only a write can meet
_ADVICE = {
    errno.ENOSPC: "free space on that disk, or point {target} at another disk",
    errno.EDQUOT: "your disk quota is used up: free some of it, or point {target} at another disk",
    errno.EROFS: "that disk is read-only: point {target} at a writable disk",
    errno.EACCES: "check that path's permissions, or point {target} at a directory you may write",
    errno.EPERM: "check that path's permissions, or point {target} at a directory you may write",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
    errno.EIO: "the disk reported an I/O error: check the disk, then run the command again",
}
# Orbax's writer (tensorstore) and safetensors report a failed write as a ValueError or their own
# error, naming the OS's code in their message ([os_error_code='28'], also as a repr escapes it;
# "(os error 28)"); numpy's tofile as an OSError without one
_OS_CODE = re.compile(r"\[os_error_code=\\?'(\d+)\\?'\]|\(os error (\d+)\)")
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def os_error_in(e: BaseException) -> OSError | None:
    """The operating-system error behind ``e``: ``e`` itself, one it was raised from, or the one
    the message of Orbax's or safetensors' writer names (``_OS_CODE``); None when there is none."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and not isinstance(e, DsmoeError):
            if e.errno is not None:
                return e
            if _SHORT_WRITE.fullmatch(str(e)):  # a short write to a file: its disk (or quota) is full
                return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a write was cut short)")
        match = _OS_CODE.search(str(e))
        if match:
            code = int(match.group(1) or match.group(2))
            return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None


def storage_error(e: BaseException, who: str, output: str | os.PathLike | None = None,
                  target: str = "the output", then: str = "") -> StorageError | None:
    """The operating-system error behind ``e`` (``os_error_in``) as one line, ``<who> could not
    write: <path>: <strerror> — <what to do>`` (``<who> failed: ...`` for errors a read can meet
    too); None when there is none. The path is the file ``e`` names, else ``output`` for a write
    error; ``target`` is the option that chooses the output (``--workdir``, ...); ``then`` ends
    the advice (what to do next)."""
    os_error = os_error_in(e) or (e if isinstance(e, OSError) and not isinstance(e, DsmoeError) else None)
    if os_error is None:
        return None
    write = os_error.errno in WRITE_ERRNOS
    path = os_error.filename if os_error.filename is not None else output if write else None
    advice = _ADVICE.get(os_error.errno, "check the path and the disk, then run the command again")
    where = f"{os.fspath(path)}: " if path is not None else ""
    return StorageError(f"{who} {'could not write' if write else 'failed'}: {where}{os_error.strerror or os_error} "
                        f"— {advice.format(target=target)}{'; ' + then if then else ''}")


class _SecondHandReports(logging.Filter):
    """Drops the log records that repeat an OS error (Orbax logs a failed write with its
    traceback from each of its threads, asyncio each future nobody awaited): the error itself
    reaches the caller, and the command line prints it as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            exc = record.exc_info[1] if record.exc_info else None
            repeats = exc is not None and os_error_in(exc) is not None
            return not (repeats or _OS_CODE.search(record.getMessage()))
        except Exception:  # noqa: BLE001 - a record that cannot be read is kept, not lost
            return True


_SECOND_HAND = _SecondHandReports()


def _is_write_teardown(u) -> bool:
    """An unraisable exception of a write Orbax abandoned when another failed: its callbacks
    find their event loop closed, its coroutines are finalised at exit."""
    code = getattr(u.object, "cr_code", None)
    return (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
            or code is not None and "orbax" in code.co_filename)


def drop_second_hand_reports() -> None:
    """From now on in this process, drop what merely repeats an OS error (``_SecondHandReports``,
    ``_is_write_teardown``): the command line's one line is its only report. Installed once."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_SECOND_HAND)  # a no-op for a filter already there
    previous, is_teardown = sys.unraisablehook, _is_write_teardown  # held here: at exit, globals may be gone
    if getattr(previous, "drops_write_teardown", False):
        return

    def hook(u) -> None:
        try:
            if is_teardown(u):
                return
        except Exception:  # noqa: BLE001 - at exit, when modules are torn down: report it as Python would
            pass
        previous(u)

    hook.drops_write_teardown = True
    sys.unraisablehook = hook


def deprecated_error(module: str, name: str) -> type[DsmoeError]:
    """Error class ``name`` reached by its old path ``module.name`` (``module``'s ``__getattr__``),
    with a DeprecationWarning: modules that exported error classes of their own keep them until 0.4."""
    warnings.warn(f"{module}.{name} moved to dsmoe_jax.errors.{name}; the old name stops working in 0.4",
                  DeprecationWarning, stacklevel=3)
    return globals()[name]


def moved_errors(module: str, *names: str):
    """A module ``__getattr__`` that resolves ``names``, the error classes ``module`` exported,
    through ``deprecated_error``:  ``__getattr__ = errors.moved_errors(__name__, "ConfigError")``."""

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return deprecated_error(module, name)

    return __getattr__
