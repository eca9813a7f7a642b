"""Checkpoints of a training state held as arrays (Keras' JAX backend) with orbax-checkpoint.

    WORKDIR/checkpoints/<step>/                orbax's checkpoint of one saved step (orbax writes it
                                               under a temporary name and renames it when complete)
    WORKDIR/checkpoints/<step>/SHA256SUMS      the digest of every file orbax wrote, written last
    WORKDIR/checkpoints/broken/<step>-<time>/  checkpoints that failed to restore, with REASON.txt

The walk-back rule of the TensorFlow trainers holds here too: restore lists the step folders
itself, and walks from the newest down until one restores completely; newer ones that fail are
moved to broken/ with the reason. What "completely" needs beyond orbax (measured with
orbax-checkpoint 0.12.8, OCDBT layout): orbax refuses a truncated or missing data file, but
restores a checkpoint with one flipped byte in its data without a word, and restores arrays whose
shapes differ from the target it was given. So each step folder carries SHA256SUMS, written after
orbax finished: a folder without it (a save cut short between orbax's rename and the digests) or
whose files do not match it is not restored; and the restored arrays must have the target's
structure, shapes and dtypes (else CheckpointMismatch: a checkpoint of another recipe).

A state is any pytree of arrays (NumPy or JAX), such as {"trainable": [...], "step": array(5)}.
Rotation keeps the `keep` newest complete checkpoints and never deletes the newest one.
"""

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from keras_mixer.atomic_files import atomic_write
from keras_mixer.training.tf.checkpoints import CheckpointMismatch, NoCheckpointRestores

log = logging.getLogger("keras_mixer")

DIGESTS = "SHA256SUMS"


def step_folders(directory):
    """{step: folder name} of every step folder in `directory` (complete or not; orbax's
    temporary folders, whose names are not plain numbers, are not among them)."""
    if not os.path.isdir(directory):
        return {}
    return {int(name): name for name in os.listdir(directory) if name.isdigit()}


def _files(folder):
    """Every file under `folder` as a path relative to it, sorted; the digest file left out."""
    found = []
    for root, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(root, n), folder) for n in names]
    return sorted(f for f in found if f != DIGESTS)


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_digests(folder):
    """SHA256SUMS for every file in `folder` (the `sha256sum` format), replaced whole."""
    lines = "".join(f"{_sha256(os.path.join(folder, name))}  {name}\n" for name in _files(folder))
    atomic_write(os.path.join(folder, DIGESTS), lambda f: f.write(lines.encode()))


def verify_digests(folder):
    """Raises ValueError naming the first problem: no SHA256SUMS (the save did not finish), a file
    missing, added or changed since it was written."""
    path = os.path.join(folder, DIGESTS)
    if not os.path.isfile(path):
        raise ValueError(f"{DIGESTS} is missing: the save did not finish")
    with open(path) as f:
        expected = dict(reversed(line.rstrip("\n").split("  ", 1)) for line in f if line.strip())
    present = _files(folder)
    for name in sorted(set(expected) - set(present)):
        raise ValueError(f"{name} is missing")
    for name in present:
        if name not in expected:
            raise ValueError(f"{name} was not part of the save")
        if _sha256(os.path.join(folder, name)) != expected[name]:
            raise ValueError(f"{name} does not match its SHA-256 digest: the file changed after it was written")


def check_fits(restored, target):
    """Raises CheckpointMismatch unless `restored` has `target`'s tree structure and each array
    its shape and dtype."""
    import jax

    have, have_tree = jax.tree_util.tree_flatten_with_path(restored)
    want, want_tree = jax.tree_util.tree_flatten_with_path(target)
    if have_tree != want_tree:
        raise CheckpointMismatch(f"its state has another structure ({len(have)} arrays, this run's {len(want)})")
    for (path, got), (_, expected) in zip(have, want):
        # shape and dtype only: np.asarray of an array spread over several hosts would fail
        got, expected = (x if hasattr(x, "dtype") else np.asarray(x) for x in (got, expected))
        if tuple(got.shape) != tuple(expected.shape) or np.dtype(got.dtype) != np.dtype(expected.dtype):
            raise CheckpointMismatch(
                f"{jax.tree_util.keystr(path)} is {got.dtype}{list(got.shape)} there and "
                f"{expected.dtype}{list(expected.shape)} here"
            )


def _give_back(real, held):
    """Points standard error (fd 2) back at `real` and writes there what `held` caught."""
    sys.stderr.flush()
    os.dup2(real, 2)
    os.close(real)
    held.seek(0)
    caught = held.read()
    held.close()
    if caught:
        os.write(2, caught)


class OrbaxStore:
    """Saves, rotates and restores a training state (a pytree of arrays) in one folder.

    Args:
        directory: WORKDIR/checkpoints.
        keep: how many complete checkpoints to keep (at least 1).
        chief: whether this process moves broken checkpoints aside, writes the digests and rotates
            (every process of a multi-host run saves its shards; one looks after the folder).
    """

    def __init__(self, directory, keep, chief=True):
        import orbax.checkpoint as ocp

        self.directory = directory
        self.keep = max(1, int(keep))
        self.chief = chief
        self.steps = sorted(step_folders(directory))  # refined by restore_newest
        self._checkpointer = ocp.StandardCheckpointer()

    def folder(self, step):
        return os.path.join(self.directory, str(step))

    def restore_newest(self, target):
        """(step, state) of the newest checkpoint that restores completely into `target`'s
        structure, or (None, None) when the folder holds no step folder. Broken newer ones are
        moved to `broken/` (chief).

        Raises NoCheckpointRestores when step folders exist but none restores (nothing is moved
        then), CheckpointMismatch when an intact checkpoint does not fit `target`."""
        found = step_folders(self.directory)
        failures = []
        for step in sorted(found, reverse=True):
            try:
                verify_digests(self.folder(step))
                state = self._checkpointer.restore(self.folder(step), target)
            except Exception as e:  # any read error makes this one unusable: try the next older one
                failures.append((step, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:250]}"))
                continue
            try:
                check_fits(state, target)
            except CheckpointMismatch as e:
                raise CheckpointMismatch(
                    f"checkpoint {self.folder(step)!r} is intact but does not fit this run's model and optimizer "
                    f"({e}). It was written by another recipe: give its recipe, or --restart."
                ) from None
            if self.chief:
                for bad_step, reason in failures:
                    self._move_aside(bad_step, reason)
            self.steps = sorted(s for s in found if s <= step)
            return step, state
        if failures:
            listing = "; ".join(f"{step}/: {reason}" for step, reason in failures)
            raise NoCheckpointRestores(
                f"{self.directory} holds {len(failures)} checkpoint(s) and none restores: {listing}. "
                f"Nothing was changed. Restore the files from a copy, or pass --restart to start again from "
                f"step 0 (the current files are moved to WORKDIR/previous/, not deleted)."
            )
        return None, None

    def _move_aside(self, step, reason):
        target = os.path.join(self.directory, "broken", f"{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(self.folder(step), target)
        atomic_write(os.path.join(target, "REASON.txt"), lambda f: f.write(f"{reason}\n".encode()))
        log.warning("Checkpoint %d does not restore (%s); moved to %s", step, reason, target)
        print(f"warning: checkpoint {step} does not restore ({reason}); moved to {target}", flush=True)

    def save(self, step, state):
        """Writes `state` as the checkpoint of `step` (waiting until it is on disk), then (chief)
        its digests, and rotates older ones out."""
        folder = self.folder(step)
        if os.path.exists(folder):  # an unfinished save of this step (no digests): orbax will not overwrite
            shutil.rmtree(folder)
        # Orbax's write threads report a failure each (a traceback), and asyncio once per pending
        # write after orbax closed its event loop; that can start before the error reaches this
        # thread. So standard error is held in a file while a save runs: shown after a save that
        # succeeds, dropped after one that fails, whose error reaches the user as one line.
        sys.stderr.flush()
        real = os.dup(2)
        held = tempfile.TemporaryFile()
        os.dup2(held.fileno(), 2)
        try:
            self._checkpointer.save(folder, state)
            self._checkpointer.wait_until_finished()
        except Exception as e:
            # The reports can come until the process ends, so standard error stays muted; the
            # exception carries the real one (`stderr_fd`) for the one line (training.cli.user_errors).
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
            held.close()
            self._checkpointer.close()
            try:
                e.stderr_fd = real
            except AttributeError:  # an exception type without a __dict__: give the stream back
                os.dup2(real, 2)
            raise
        except BaseException:  # Ctrl-C mid-save: what follows it is for the user to see
            _give_back(real, held)
            raise
        _give_back(real, held)
        if not self.chief:
            return folder
        write_digests(folder)
        self.steps = sorted({*self.steps, step})
        complete = [s for s in self.steps if os.path.isfile(os.path.join(self.folder(s), DIGESTS))]
        for old in complete[: -self.keep]:  # never the newest: keep >= 1
            shutil.rmtree(self.folder(old), ignore_errors=True)
        self.steps = complete[-self.keep :]
        return folder

    def latest(self):
        return self.folder(self.steps[-1]) if self.steps else None
