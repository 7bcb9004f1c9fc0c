"""Checkpoints (orbax) and the output folder's lock.

* :class:`Checkpoints` keeps the latest ``keep`` checkpoints and the best one
  by validation top-1 (orbax ``LatestN`` + ``BestN``). orbax writes each
  checkpoint into a temporary folder and renames it when complete, so a crash
  during a save leaves the previous checkpoints untouched and the half-written
  one is ignored (and cleaned up) on the next start.
* Each checkpoint stores the train state - what trains and changes: the
  trainable parameters, their optimizer state, the changing BatchNorm
  statistics, step, RNG - plus a JSON record of where the run was (epoch,
  batch within the epoch, the partial epoch's metric sums, the stage) and of
  the file its frozen groups come from (path and sha256): enough for
  ``--resume`` to continue bit for bit. Frozen weights are not written again
  every epoch (a feature-extraction checkpoint is the head and its optimizer
  state). Checkpoints written before this layout hold the whole model; the
  trainer still restores them (``STATE_LAYOUT_KEY`` tells them apart).
* The optimizer state is stored as the list of its arrays, not as its tree.
  optax.multi_transform keeps one inner state per label, each a copy of the
  whole parameter tree with ``MaskedNode`` placeholders outside its label:
  MobileNetV2 feature extraction has 158 parameter arrays but 6993 optimizer
  state nodes, and orbax spent most of every save walking them. Restoring
  unflattens the list with the structure of the optimizer the run builds
  anyway (``abstract_state``).
* :class:`RunLock` is an ``flock`` on ``<output>/.lock``: a second run on the
  same folder is refused; the lock dies with its process (even ``kill -9``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from jaxtl.errors import CheckpointError
from jaxtl.training.parallel import lost_process


class RunLock:
    def __init__(self, directory: Path):
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                owner = self.path.read_text().strip() or "another process"
                raise CheckpointError(f"{self.path.parent} is in use by another training run ({owner}); "
                                      "wait for it to finish or choose another --output") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def ranking(metric: str):
    """The orbax ``best_fn`` (higher is better) of a metric name: top-1 as it is, a loss negated."""
    if metric == "val_loss":
        return lambda metrics: -float(metrics["val_loss"])
    return lambda metrics: float(metrics[metric])


# The record's marker of a checkpoint whose state holds only what trains (see the module docstring).
STATE_LAYOUT_KEY, STATE_TRAINABLE = "state_layout", "trainable"

# The record's marker of a checkpoint whose optimizer state is the list of its arrays; checkpoints
# without it (older checkpoints) hold the whole tree and restore as they were written.
OPT_LAYOUT_KEY, OPT_LAYOUT_LEAVES = "opt_state_layout", "leaves"


def _compact(state: Any) -> Any:
    """The state with its optimizer state as a flat list of arrays (placeholder nodes dropped)."""
    return state.replace(opt_state=jax.tree.leaves(state.opt_state))


def _expand(stored: Any, template: Any) -> Any:
    """Inverse of :func:`_compact`: the list back into the template's optimizer tree."""
    return stored.replace(opt_state=jax.tree.unflatten(jax.tree.structure(template.opt_state), stored.opt_state))


TMP_MARK = ".orbax-checkpoint-tmp"  # orbax writes step N into "N.orbax-checkpoint-tmp..." and renames it when done


def _remove_unfinished(directory: Path) -> None:
    if directory.is_dir():
        for tmp in directory.glob(f"*{TMP_MARK}*"):
            shutil.rmtree(tmp, ignore_errors=True)


class Checkpoints:
    """The run's checkpoints under ``<output>/checkpoints``."""

    def __init__(self, directory: Path, keep: int = 2, best_metric: str = "val_top1"):
        self.directory = Path(directory).absolute()
        _metric = ranking(best_metric)
        policy = cm.AnyPreservationPolicy([
            cm.LatestN(n=max(keep, 1)),
            cm.BestN(get_metric_fn=_metric, reverse=False, n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn too: without it orbax's best_step() is the latest step (the preservation policy alone
        # keeps the best checkpoint on disk but does not name it), so --export best exported the last
        # state; with it the metrics are stored beside each checkpoint and survive --resume.
        # Half-written saves (a kill during a write) are removed here, before orbax starts: orbax's own
        # clean-up runs in a thread that outlived a quick exit (a refused --resume) and logged a traceback.
        _remove_unfinished(self.directory)
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_metric, best_mode="max",
                                               enable_async_checkpointing=False, create=True,
                                               cleanup_tmp_directories=False)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise CheckpointError(f"cannot use {self.directory} for checkpoints: {e.strerror or e}") from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, state: Any, record: dict, metrics: dict | None = None) -> None:
        """Save synchronously; raises CheckpointError (previous checkpoints intact) on failure.

        Synchronous on purpose: on a machine with few cores orbax's background write competes with
        the next epoch for them, and a cheap epoch (cached features) got no faster."""
        state, record = _compact(state), {**record, OPT_LAYOUT_KEY: OPT_LAYOUT_LEAVES}
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            record=ocp.args.JsonSave(record)),
                              metrics=metrics, force=True)
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - tensorstore and orbax raise more than OSError (e.g. on ENOSPC)
            if lost_process(e):  # not the disk: the trainer says another process is gone
                raise
            why = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(f"saving the checkpoint of step {step} failed ({why}); the previous checkpoint in "
                                  f"{self.directory} is intact; free some space and continue with --resume") from None

    def record(self, step: int) -> dict:
        """The JSON record of checkpoint ``step`` alone (epoch, batch, stage, ...)."""
        try:
            return dict(self.manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))["record"])
        except Exception as e:  # noqa: BLE001 - orbax raises many types for bad folders
            raise self._unreadable(step, e) from None

    def restore(self, step: int, abstract_state: Any, record: dict | None = None) -> tuple[Any, dict]:
        """The state of checkpoint ``step`` in the structure (and shardings) of ``abstract_state``,
        and its record (``record``: the one :meth:`record` returned, so that it is read once)."""
        if record is None:
            record = self.record(step)  # it says how the state was stored
        compact = record.get(OPT_LAYOUT_KEY) == OPT_LAYOUT_LEAVES
        target = _compact(abstract_state) if compact else abstract_state
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:  # noqa: BLE001 - orbax raises many types for bad folders
            raise self._unreadable(step, e) from None
        state = _expand(out["state"], abstract_state) if compact else out["state"]
        return state, {k: v for k, v in record.items() if k != OPT_LAYOUT_KEY}

    def _unreadable(self, step: int, e: Exception) -> CheckpointError:
        return CheckpointError(f"cannot restore checkpoint {step} from {self.directory} "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); "
                               "it was written by a different configuration?")

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree, the target orbax restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)
