"""A run's checkpoints on disk, the same rules on either Keras backend: walk back to the newest one
that restores, move broken ones aside, rotate. How one checkpoint is written and read is the
engine's `CheckpointFormat` (tf.train files: `training.tf.checkpoints`; orbax folders:
`training.jax.checkpoints`); this module never reads one itself.

    WORKDIR/checkpoints/<one checkpoint per saved step>     ckpt-<step>.index + .data-* files
                                                            (TensorFlow), or a <step>/ folder (orbax)
    WORKDIR/checkpoints/broken/<name>-<time>/               checkpoints that failed to restore,
                                                            with REASON.txt

The rule: restore never trusts a state file; it lists the checkpoints itself and walks from the
newest step down until one restores completely. Newer ones that fail are moved to broken/ with the
reason (by the chief). When some exist but none restores, nothing is moved and each is listed
(NoCheckpointRestores); an intact one that does not fit the run's state is refused, not walked past
(CheckpointMismatch). Rotation keeps the `keep` newest complete checkpoints and never deletes the
newest one.
"""

import logging
import os
import re
import shutil
import time
from typing import Protocol

from keras_mixer.atomic_files import atomic_write

log = logging.getLogger("keras_mixer")

# The file names of a TensorFlow checkpoint; orbax's step folders are plain numbers.
TF_FILE = re.compile(r"^ckpt-(\d+)(?:\.index|\.data-\d+-of-\d+)$")


class NoCheckpointRestores(RuntimeError):
    """Checkpoints exist but none restores; the message lists each with its reason."""


class CheckpointMismatch(ValueError):
    """An intact checkpoint that does not fit the model being trained."""


def checkpoint_backend(directory):
    """The Keras backend whose trainer wrote the checkpoints in `directory`: "tensorflow"
    (ckpt-<step> files, here or in broken/), "jax" (orbax step folders) or None."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    broken = os.path.join(directory, "broken")
    moved = [n for _, _, files in os.walk(broken) for n in files] if os.path.isdir(broken) else []
    if any(TF_FILE.match(n) for n in names + moved):
        return "tensorflow"
    if any(n.isdigit() for n in names) or (os.path.isdir(broken) and os.listdir(broken)):
        return "jax"
    return None


def has_broken(directory):
    """True when earlier restores moved checkpoints of `directory` to its broken/ folder."""
    broken = os.path.join(directory, "broken")
    return os.path.isdir(broken) and bool(os.listdir(broken))


def reason(error):
    """One line (at most 300 characters) saying why a checkpoint did not restore."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


class CheckpointFormat(Protocol):
    """How one engine writes and reads a checkpoint of one step in a folder."""

    def steps(self, directory):
        """{step: [file or folder names]} of every checkpoint in `directory`, complete or not."""

    def path(self, directory, step):
        """The checkpoint's path, as messages name it (a file prefix or a folder)."""

    def name(self, step):
        """The checkpoint's name in messages and in broken/ ("ckpt-5", "5")."""

    def verify(self, directory, step):
        """Raises when the checkpoint is missing, truncated or corrupt."""

    def read(self, directory, step, target):
        """Restores the checkpoint (verified first) into the run's state, or returns it in
        `target`'s structure; raises on damage, CheckpointMismatch when it does not fit."""

    def write(self, directory, step, state):
        """Writes the checkpoint of `step` (every process of the run calls it)."""

    def seal(self, directory, step):
        """Chief only, after `write`: whatever marks the checkpoint complete."""

    def complete(self, directory, step):
        """True when the checkpoint was written completely."""

    def remove(self, directory, step):
        """Deletes the checkpoint."""

    def move(self, directory, step, target):
        """Moves the checkpoint into the new folder `target`."""

    def record(self, directory, steps):
        """Chief only: the format's own list of the kept checkpoints, if it has one."""


class CheckpointStore:
    """Saves, rotates and restores one run's checkpoints in one folder.

    Args:
        format: the engine's `CheckpointFormat`.
        directory: WORKDIR/checkpoints.
        keep: how many complete checkpoints to keep (at least 1).
        chief: whether this process looks after the folder (moves broken checkpoints aside, seals,
            rotates); every process of a run writes its part.
        write_dir: where this process writes, when not `directory`: a non-chief worker of a
            TensorFlow multi-worker run writes a copy of its own (saving is collective) and keeps
            only its newest.
    """

    def __init__(self, format, directory, keep, chief=True, write_dir=None):
        self.format = format
        self.directory = directory
        self.keep = max(1, int(keep))
        self.chief = chief
        self.write_dir = write_dir or directory
        self.steps = sorted(format.steps(directory))  # refined by restore_newest

    def path(self, step):
        return self.format.path(self.directory, step)

    def latest(self):
        return self.path(self.steps[-1]) if self.steps else None

    def newest_intact(self):
        """The path of the newest checkpoint that verifies, or None (nothing is restored)."""
        for step in sorted(self.format.steps(self.directory), reverse=True):
            try:
                self.format.verify(self.directory, step)
                return self.path(step)
            except Exception:  # any read error: the next older one
                continue
        return None

    def restore_newest(self, target=None):
        """(step, what the format's `read` returned) of the newest checkpoint that restores
        completely, or (None, None) when the folder holds none. Broken newer ones are moved to
        broken/ (chief).

        Raises NoCheckpointRestores when checkpoints exist but none restores (nothing is moved
        then), CheckpointMismatch when an intact one does not fit the run."""
        found = self.format.steps(self.directory)
        failures = []
        for step in sorted(found, reverse=True):
            try:
                restored = self.format.read(self.directory, step, target)
            except CheckpointMismatch as e:
                raise CheckpointMismatch(
                    f"checkpoint {self.path(step)!r} is intact but does not fit this run's model and optimizer "
                    f"({e}). It was written by another recipe: give its recipe, or --restart."
                ) from None
            except Exception as e:  # any read error makes this one unusable: try the next older one
                failures.append((step, reason(e)))
                continue
            if self.chief and failures:
                for bad_step, why in failures:
                    self._move_aside(bad_step, why)
                self.format.record(self.directory, sorted(s for s in found if s <= step))
            self.steps = sorted(s for s in found if s <= step)
            return step, restored
        if failures:
            listing = "; ".join(f"{self._listed(step, found[step])}: {why}" for step, why in failures)
            raise NoCheckpointRestores(
                f"{self.directory} holds {len(failures)} checkpoint(s) and none restores: {listing}. "
                f"Nothing was changed. Restore the files from a copy, or pass --restart to start again from "
                f"step 0 (the current files are moved to WORKDIR/previous/, not deleted)."
            )
        return None, None

    def _listed(self, step, names):
        """ "5/" for a checkpoint that is one folder, "ckpt-5 (its files)" for one made of files."""
        name = self.format.name(step)
        return f"{name}/" if names == [name] else f"{name} ({', '.join(sorted(names))})"

    def _move_aside(self, step, why):
        name = self.format.name(step)
        target = os.path.join(self.directory, "broken", f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        self.format.move(self.directory, step, target)
        atomic_write(os.path.join(target, "REASON.txt"), lambda f: f.write(f"{why}\n".encode()))
        log.warning("Checkpoint %s does not restore (%s); moved to %s", name, why, target)
        print(f"warning: checkpoint {name} does not restore ({why}); moved to {target}", flush=True)

    def save(self, step, state=None):
        """Writes the checkpoint of `step` (`state`: what the format writes, where it is not the
        run's own), then (chief) seals it, records it and rotates older ones out."""
        self.format.write(self.write_dir, step, state)
        if not self.chief:
            if self.write_dir != self.directory:  # a copy only because saving is collective: the newest
                for old in self.format.steps(self.write_dir):
                    if old != step:
                        self.format.remove(self.write_dir, old)
            return self.format.path(self.write_dir, step)
        self.format.seal(self.directory, step)
        if not self.format.complete(self.directory, step):
            raise OSError(f"checkpoint {self.path(step)!r} was not written completely")
        self.steps = sorted({*self.steps, step})
        complete = [s for s in self.steps if self.format.complete(self.directory, s)]
        for old in complete[: -self.keep]:  # never the newest: keep >= 1
            self.format.remove(self.directory, old)
        self.steps = complete[-self.keep :]
        self.format.record(self.directory, self.steps)
        return self.path(step)

    def discard_copies(self):
        """Deletes this process's own copies (a non-chief worker's write_dir)."""
        if self.write_dir != self.directory:
            shutil.rmtree(self.write_dir, ignore_errors=True)
