"""The JAX engine's checkpoints: a training state held as arrays, written by orbax-checkpoint,
under the shared store's rules (`training.checkpoint_store`).

    WORKDIR/checkpoints/<step>/                orbax's checkpoint of one saved step (orbax writes it
                                               under a temporary name and renames it when complete)
    WORKDIR/checkpoints/<step>/SHA256SUMS      the digest of every file orbax wrote, written last

What "restores completely" needs beyond orbax (measured with
orbax-checkpoint 0.12.8, OCDBT layout): orbax refuses a truncated or missing data file, but
restores a checkpoint with one flipped byte in its data without a word, and restores arrays whose
shapes differ from the target it was given. So each step folder carries SHA256SUMS, written after
orbax finished: a folder without it (a save cut short between orbax's rename and the digests) or
whose files do not match it is not restored; and the restored arrays must have the target's
structure, shapes and dtypes (else CheckpointMismatch: a checkpoint of another recipe).

A state is any pytree of arrays (NumPy or JAX), such as {"trainable": [...], "step": array(5)}.
"""

import hashlib
import logging
import os
import shutil
import sys
import tempfile

import numpy as np

from keras_mixer.atomic_files import atomic_write
from keras_mixer.training.checkpoint_store import CheckpointMismatch, CheckpointStore

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


class OrbaxCheckpoints:
    """`checkpoint_store.CheckpointFormat` of a pytree of arrays: orbax step folders, each with
    its SHA256SUMS. `read` returns the restored state in its target's structure."""

    def __init__(self):
        import orbax.checkpoint as ocp

        self._checkpointer = ocp.StandardCheckpointer()

    def steps(self, directory):
        return {step: [name] for step, name in step_folders(directory).items()}

    def path(self, directory, step):
        return os.path.join(directory, self.name(step))

    def name(self, step):
        return str(step)

    def verify(self, directory, step):
        verify_digests(self.path(directory, step))

    def read(self, directory, step, target):
        self.verify(directory, step)
        state = self._checkpointer.restore(self.path(directory, step), target)
        check_fits(state, target)
        return state

    def write(self, directory, step, state):
        """Writes `state`, waiting until it is on disk."""
        folder = self.path(directory, step)
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
            # exception carries the real one (`stderr_fd`) for the one line (programs.command_lines.user_errors).
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

    def seal(self, directory, step):
        write_digests(self.path(directory, step))

    def complete(self, directory, step):
        return os.path.isfile(os.path.join(self.path(directory, step), DIGESTS))

    def remove(self, directory, step):
        shutil.rmtree(self.path(directory, step), ignore_errors=True)

    def move(self, directory, step, target):
        os.rename(self.path(directory, step), target)

    def record(self, directory, steps):
        pass  # the step folders are the list


def orbax_store(directory, keep, chief=True):
    """A `CheckpointStore` of orbax step folders in `directory`: every process of a multi-host
    run writes its shards into the same folders; the chief seals, rotates and moves aside."""
    return CheckpointStore(OrbaxCheckpoints(), directory, keep, chief=chief)
