"""The training Checkpointer: params, optimizer state, step and the data iterator, saved together.

A run's workdir holds ``config.json`` (the run's config, written before the first step) and
``checkpoints/<step>/`` with the items ``params``, ``opt`` (step and optimizer state),
``data`` (the grain iterator) and, for a LoRA run only, ``adapter`` (so that the checkpoints of
other runs are as they were). Orbax writes each checkpoint into a temporary directory and renames
it when complete, so a crash mid-save never exposes a half-written checkpoint. A checkpoint
damaged afterwards (a disk error, a file removed by hand) is moved to ``damaged_checkpoints/``
on resume, with a warning, and the run resumes from the newest intact one. A save that fails for
the disk (full, read-only) is one ``StorageError`` naming the newest intact checkpoint, which
``--resume`` continues from. Reading checkpoints outside training (``load_checkpoint``) is library
code: ``dsmoe_jax/checkpoint.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import shutil
import sys
import time

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from tqdm import tqdm

from dsmoe_jax.checkpoint import CHECKPOINTS_DIR, read_config
from dsmoe_jax.config import Config
from dsmoe_jax.errors import CheckpointError, StorageError, os_error_in, storage_error

MODEL_SECTIONS = ("model", "moe", "mla", "yarn")


def model_differences(a: Config, b: Config, ignore: frozenset[str] = frozenset(),
                      labels: tuple[str, str] = ("saved", "now")) -> list[str]:
    """Each ``section.key`` of the model sections whose value differs between ``a`` and ``b``
    (a section on one side only differs in each of its keys), with both values, labelled;
    keys named in ``ignore`` (``"model.dtype"``, ...) do not count. An unset ``model.n_kv_heads``
    equals ``model.n_heads`` (converted checkpoints always set it)."""
    explicit = lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, n_kv_heads=c.model.kv_heads))
    da, db = explicit(a).to_dict(), explicit(b).to_dict()
    return [f"{s}.{k}: {da.get(s, {}).get(k)!r} ({labels[0]}) vs {db.get(s, {}).get(k)!r} ({labels[1]})"
            for s in MODEL_SECTIONS for k in sorted(set(da.get(s, {})) | set(db.get(s, {})))
            if f"{s}.{k}" not in ignore and da.get(s, {}).get(k) != db.get(s, {}).get(k)]


DAMAGED_DIR = "damaged_checkpoints"
# How long closing a restore's event loop waits for the reads still in flight (a damaged
# checkpoint's other arrays): about one whole restore at most; bounded so that it never hangs.
DRAIN_TIMEOUT = 300.0


class DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``close()`` first lets the tasks still pending on it finish.

    Orbax runs each restore on a fresh loop and closes it as soon as the restore raises, while
    tensorstore still reads other arrays for tasks of that loop; each read that completes then
    calls into the closed loop and prints a "RuntimeError: Event loop is closed" traceback."""

    def close(self) -> None:
        if not self.is_running() and not self.is_closed():
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while (tasks := asyncio.all_tasks(self)) and (left := deadline - time.monotonic()) > 0:
                done, _ = self.run_until_complete(asyncio.wait(tasks, timeout=left))
                for task in done:  # retrieved: the failure that counts is the one the restore raised
                    if not task.cancelled():
                        task.exception()
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return DrainingLoop()


@contextlib.contextmanager
def draining_event_loops():
    """Within it, ``asyncio.new_event_loop()`` (how Orbax gets a loop for each restore) makes a
    :class:`DrainingLoop`."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def nothing_to_resume(workdir: pathlib.Path) -> CheckpointError:
    return CheckpointError(f"--resume: {workdir} holds no checkpoint to resume from (a mistyped --workdir, or a run "
                           "stopped before its first checkpoint); check the path, or drop --resume to start a new "
                           "run there")


class Checkpointer:
    """Saves every ``train.checkpoint_every`` steps asynchronously, keeps the last
    ``train.keep_checkpoints``; restores the latest complete one."""

    def __init__(self, workdir: str | os.PathLike, cfg: Config):
        self.workdir = pathlib.Path(workdir).absolute()
        self.cfg = cfg
        self._saving: int | None = None  # the step of the last save started
        self._failed = False  # a save failed: Orbax would raise it again at every wait
        self.manager = ocp.CheckpointManager(
            self.workdir / CHECKPOINTS_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=cfg.train.keep_checkpoints, enable_async_checkpointing=True, create=True,
                # a save cut short (two Ctrl-Cs, kill -9) leaves a temporary folder: gone at the next start
                cleanup_tmp_directories=True),
            item_handlers={"params": ocp.StandardCheckpointHandler(), "opt": ocp.StandardCheckpointHandler(),
                           "adapter": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
        )

    def check_compatible(self, resume: bool) -> int | None:
        """The step to resume from (None for a fresh run); refuses a workdir that holds another
        model's checkpoints, or checkpoints when ``resume`` is off."""
        latest = self.manager.latest_step()
        if latest is None:
            if resume:
                raise nothing_to_resume(self.workdir)
            return None
        if not resume:
            raise CheckpointError(f"{self.workdir} already holds checkpoints (latest step {latest}); pass --resume "
                                  "to continue that run, or choose a new --workdir")
        saved = read_config(self.workdir)
        diffs = model_differences(saved, self.cfg)
        if diffs:
            raise CheckpointError(f"{self.workdir} holds checkpoints of a different model ({'; '.join(diffs)}); "
                                  "resume with the saved config, or start a new --workdir")
        # the adapter's shapes (and whether there is one) follow these; a checkpoint without it would
        # otherwise read as damaged
        lora = [f"train.lora.{k}: {getattr(saved.train.lora, k)!r} (saved) vs {getattr(self.cfg.train.lora, k)!r} (now)"
                for k in ("rank", "targets") if getattr(saved.train.lora, k) != getattr(self.cfg.train.lora, k)]
        if lora and (saved.train.lora.rank or self.cfg.train.lora.rank):
            raise CheckpointError(f"{self.workdir} holds checkpoints of a run with other LoRA adapters "
                                  f"({'; '.join(lora)}); resume with the saved train.lora, or start a new --workdir")
        return latest

    def save(self, step: int, state, data_iterator) -> None:
        self.wait()  # Orbax waits for the previous save here anyway: its failure is named as its own
        adapter = {"adapter": ocp.args.StandardSave(state.adapter)} if state.adapter else {}
        with self._writing(step):
            self.manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                **adapter,
            ))
        self._saving = step

    def restore(self, step: int, abstract_state, data_iterator):
        """The train state at ``step``; ``data_iterator`` is set to the position saved with it."""
        adapter = {"adapter": ocp.args.StandardRestore(abstract_state.adapter)} if abstract_state.adapter else {}
        with draining_event_loops():  # a damaged checkpoint fails with its one error, not a traceback per read
            restored = self.manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state.params),
                opt=ocp.args.StandardRestore({"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
                **adapter,
            ))
        try:
            self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
        except ValueError:
            # Saved by a different number of processes (grain keeps one state per process). All
            # processes stand at the same batch, one batch per step, and global batch k holds
            # the same windows whatever the process count (data.batches, data.mixture_batches), so
            # position by step.
            data_iterator.set_state({"next_index": step})
        return type(abstract_state)(restored.opt["step"], restored.params, restored.opt["opt_state"],
                                    restored.adapter if adapter else {})

    def restore_latest(self, abstract_state, data_iterator):
        """``(step, state)`` of the newest checkpoint that restores; each damaged newer one is
        moved to ``damaged_checkpoints/`` (never deleted) with a warning naming it."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001 - Orbax and tensorstore report damage as many error types
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                tqdm.write(f"warning: checkpoint step {step} in {self.workdir / CHECKPOINTS_DIR} is damaged "
                           f"({reason}); moved to {self._set_aside(step)}, trying the next older checkpoint",
                           file=sys.stderr)
        raise CheckpointError(f"{self.workdir} holds no intact checkpoint (the damaged ones are in "
                              f"{self.workdir / DAMAGED_DIR}); start a new run, or restore them from a backup")

    def _set_aside(self, step: int) -> pathlib.Path:
        """Move checkpoint ``step`` out of Orbax's sight, so that a later save of the same step
        does not collide with it; process 0 moves, every process waits for it."""
        target = self.workdir / DAMAGED_DIR / str(step)
        if jax.process_index() == 0:
            target.parent.mkdir(exist_ok=True)
            if target.exists():  # damaged at this step before: keep both
                target = target.with_name(f"{step}.{len(list(target.parent.glob(f'{step}*')))}")
            shutil.move(self.workdir / CHECKPOINTS_DIR / str(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside damaged checkpoint {step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        if not self._failed:
            with self._writing(self._saving):
                self.manager.wait_until_finished()

    def close(self) -> None:
        if not self._failed:
            self.manager.close()
            return
        with contextlib.suppress(Exception):  # the failure was raised once; closing repeats it
            self.manager.close()

    @contextlib.contextmanager
    def _writing(self, step: int | None):
        """A save (or the wait for one) of ``step``: a disk error is raised as ``storage_error``'s."""
        try:
            yield
        except Exception as e:
            error = self.storage_error(e, f"checkpoint step {step}" if step is not None else "a checkpoint")
            if error is None:
                raise
            self._failed = True
            raise error from e

    def storage_error(self, e: BaseException, what: str, output: pathlib.Path | None = None) -> StorageError | None:
        """``e`` as one line when a full or read-only disk lies behind it, naming ``what`` failed
        (in ``output``, default the checkpoints) and the newest intact checkpoint, the one
        ``--resume`` continues from; None otherwise."""
        if os_error_in(e) is None and not isinstance(e, OSError):
            return None
        with contextlib.suppress(Exception):  # the failed save is not on disk: list what is
            self.manager.reload()
        latest = self.manager.latest_step()
        then = (f"the last intact checkpoint is step {latest}: rerun with --resume (in this workdir, or a copy of "
                "it) to continue from it" if latest is not None else
                "no checkpoint is complete yet: rerun the same command to start again")
        return storage_error(e, f"train ({what})", output or self.workdir / CHECKPOINTS_DIR, "--workdir", then)
