"""Checkpoints: the training state (model, optimizer, step, data seed, RNG states) on disk.

    WORKDIR/checkpoints/ckpt-<step>.index, ckpt-<step>.data-*   one checkpoint per saved step
    WORKDIR/checkpoints/checkpoint                              TensorFlow's state file (for
                                                                `tf.train.latest_checkpoint`)
    WORKDIR/checkpoints/broken/ckpt-<step>-<time>/              checkpoints that failed to restore,
                                                                with REASON.txt

Restore never trusts the state file: it lists the `ckpt-*` files themselves, and walks from the
newest step down until one restores completely (every tensor read back with its checksum, every
object of the run matched). Newer ones that fail are moved to `broken/` with the reason and the
state file is rewritten. Rotation keeps the `keep` newest checkpoints that were written completely
and never deletes the newest one.
"""

import logging
import os
import re
import shutil
import time

from keras_mixer.atomic_files import atomic_write

log = logging.getLogger("keras_mixer")

STATE_FILE = "checkpoint"
_NAME = re.compile(r"^ckpt-(\d+)(?:\.index|\.data-\d+-of-\d+)$")


class NoCheckpointRestores(RuntimeError):
    """Checkpoint files exist but none restores; the message lists each with its reason."""


class CheckpointMismatch(ValueError):
    """An intact checkpoint that does not fit the model being trained."""


def checkpoint_steps(directory):
    """{step: [file names]} for every ckpt-<step> file in `directory` (complete or not)."""
    found = {}
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            match = _NAME.match(name)
            if match:
                found.setdefault(int(match.group(1)), []).append(name)
    return found


def checkpoint_backend(directory):
    """The Keras backend whose trainer wrote the checkpoints in `directory`: "tensorflow"
    (ckpt-<step> files, here or in broken/), "jax" (orbax step folders, `orbax_store`) or None."""
    if has_checkpoint_files(directory):
        return "tensorflow"
    if os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory)):
        return "jax"
    broken = os.path.join(directory, "broken")
    return "jax" if os.path.isdir(broken) and os.listdir(broken) else None


def has_checkpoint_files(directory):
    """True when `directory` or its `broken/` folder holds any checkpoint file at all."""
    if checkpoint_steps(directory):
        return True
    broken = os.path.join(directory, "broken")
    return os.path.isdir(broken) and any(files for _, _, files in os.walk(broken))


def verify(prefix):
    """Reads every tensor of checkpoint `prefix` back (TensorFlow checks each one's CRC32C).
    Raises on a missing, truncated or corrupt index or data file."""
    if not os.path.isfile(prefix + ".index"):
        raise FileNotFoundError(f"{os.path.basename(prefix)}.index is missing")
    import tensorflow as tf  # here: the JAX trainer uses this module's folder rules without TensorFlow

    reader = tf.train.load_checkpoint(prefix)
    for name in reader.get_variable_to_shape_map():
        reader.get_tensor(name)


def newest_intact(prefixes):
    """(the first of `prefixes` that `verify` reads back completely or None, [(prefix, reason)] of
    those before it that failed). `prefixes` come newest first."""
    failures = []
    for prefix in prefixes:
        try:
            verify(prefix)
            return prefix, failures
        except Exception as e:  # any read error makes this one unusable: try the next older one
            failures.append((prefix, _reason(e)))
    return None, failures


def _reason(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


class CheckpointStore:
    """Saves, rotates and restores a `tf.train.Checkpoint` in one folder.

    Args:
        checkpoint: the `tf.train.Checkpoint` of the run.
        directory: WORKDIR/checkpoints.
        keep: how many complete checkpoints to keep (at least 1).
        write_dir: where this process writes; a non-chief worker of a multi-worker run must write
            too (the save is collective) but keeps only its newest copy, in a folder of its own.
    """

    def __init__(self, checkpoint, directory, keep, write_dir=None):
        self.checkpoint = checkpoint
        checkpoint.save_counter  # created now, so every checkpoint holds it (older ones written by save() do)
        self.directory = directory
        self.keep = max(1, int(keep))
        self.write_dir = write_dir or directory
        self.chief = self.write_dir == directory
        self.steps = sorted(checkpoint_steps(directory))  # refined by restore_newest

    def prefix(self, step, directory=None):
        return os.path.join(directory or self.directory, f"ckpt-{step}")

    def restore_newest(self):
        """Restores the newest checkpoint that restores completely; returns its step, or None when
        the folder holds no checkpoint file. Broken newer ones are moved to `broken/` (chief).

        Raises NoCheckpointRestores when checkpoint files exist but none restores (nothing is
        moved then), CheckpointMismatch when an intact checkpoint does not fit the model."""
        found = checkpoint_steps(self.directory)
        newest_first = sorted(found, reverse=True)
        intact, failed = newest_intact([self.prefix(step) for step in newest_first])
        failures = [(step, found[step], reason) for step, (_, reason) in zip(newest_first, failed)]
        if intact is not None:
            try:
                self.checkpoint.restore(intact).assert_existing_objects_matched()
            except (AssertionError, ValueError) as e:
                raise CheckpointMismatch(
                    f"checkpoint {intact!r} is intact but does not fit this run's model and optimizer "
                    f"({_reason(e)}). It was written by another recipe: give its recipe, or --restart."
                ) from None
            step = newest_first[len(failures)]
            if self.chief:
                for bad_step, names, reason in failures:
                    self._move_aside(bad_step, names, reason)
            self.steps = sorted(s for s in found if s <= step)
            if self.chief and failures:
                self._write_state()
            return step
        if failures:
            listing = "; ".join(
                f"ckpt-{step} ({', '.join(sorted(names))}): {reason}" for step, names, reason in failures
            )
            raise NoCheckpointRestores(
                f"{self.directory} holds {len(failures)} checkpoint(s) and none restores: {listing}. "
                f"Nothing was changed. Restore the files from a copy, or pass --restart to start again from "
                f"step 0 (the current files are moved to WORKDIR/previous/, not deleted)."
            )
        return None

    def _move_aside(self, step, names, reason):
        target = os.path.join(self.directory, "broken", f"ckpt-{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.makedirs(target, exist_ok=True)
        for name in names:
            os.rename(os.path.join(self.directory, name), os.path.join(target, name))
        atomic_write(os.path.join(target, "REASON.txt"), lambda f: f.write(f"{reason}\n".encode()))
        log.warning("Checkpoint ckpt-%d does not restore (%s); moved to %s", step, reason, target)
        print(f"warning: checkpoint ckpt-{step} does not restore ({reason}); moved to {target}", flush=True)

    def save(self, step):
        """Writes the checkpoint for `step`, then (chief) records it and rotates older ones out."""
        prefix = self.prefix(step, self.write_dir)
        self.checkpoint.write(prefix)
        if not self.chief:  # a non-chief's copy only exists because saving is collective
            for old, names in checkpoint_steps(self.write_dir).items():
                for name in names if old != step else []:
                    os.unlink(os.path.join(self.write_dir, name))
            return prefix
        if not os.path.isfile(prefix + ".index"):
            raise OSError(f"checkpoint {prefix!r} was not written completely (no index file)")
        self.steps = sorted({*self.steps, step})
        complete = [s for s in self.steps if os.path.isfile(self.prefix(s) + ".index")]
        for old in complete[: -self.keep]:  # never the newest: keep >= 1
            for name in checkpoint_steps(self.directory).get(old, []):
                os.unlink(os.path.join(self.directory, name))
        self.steps = complete[-self.keep :]
        self._write_state()
        return prefix

    def _write_state(self):
        """TensorFlow's `checkpoint` state file, with paths relative to the folder, so a copied or
        moved workdir still resolves."""
        if not self.steps:
            return
        lines = [f'model_checkpoint_path: "ckpt-{self.steps[-1]}"']
        lines += [f'all_model_checkpoint_paths: "ckpt-{s}"' for s in self.steps]
        atomic_write(os.path.join(self.directory, STATE_FILE), lambda f: f.write(("\n".join(lines) + "\n").encode()))

    def latest(self):
        return self.prefix(self.steps[-1]) if self.steps else None

    def discard_worker_copies(self):
        if not self.chief:
            shutil.rmtree(self.write_dir, ignore_errors=True)
