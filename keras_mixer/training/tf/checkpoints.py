"""The TensorFlow engine's checkpoints: a `tf.train.Checkpoint` (model, optimizer, step, data
seed, RNG states) as files, under the shared store's rules (`training.checkpoint_store`).

    WORKDIR/checkpoints/ckpt-<step>.index, ckpt-<step>.data-*   one checkpoint per saved step
    WORKDIR/checkpoints/checkpoint                              TensorFlow's state file (for
                                                                `tf.train.latest_checkpoint`)

A checkpoint restores "completely" when every tensor reads back with its checksum and every
object of the run is matched.
"""

import os

from keras_mixer.atomic_files import atomic_write
from keras_mixer.training.checkpoint_store import TF_FILE, CheckpointMismatch, CheckpointStore, reason

STATE_FILE = "checkpoint"


def checkpoint_steps(directory):
    """{step: [file names]} for every ckpt-<step> file in `directory` (complete or not)."""
    found = {}
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            match = TF_FILE.match(name)
            if match:
                found.setdefault(int(match.group(1)), []).append(name)
    return found


def verify(prefix):
    """Reads every tensor of checkpoint `prefix` back (TensorFlow checks each one's CRC32C).
    Raises on a missing, truncated or corrupt index or data file."""
    if not os.path.isfile(prefix + ".index"):
        raise FileNotFoundError(f"{os.path.basename(prefix)}.index is missing")
    import tensorflow as tf  # here: `serving.trained_models` lists checkpoints without TensorFlow

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
            failures.append((prefix, reason(e)))
    return None, failures


class TfCheckpoints:
    """`checkpoint_store.CheckpointFormat` of a `tf.train.Checkpoint`: ckpt-<step> files."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint
        checkpoint.save_counter  # created now, so every checkpoint holds it (older ones written by save() do)

    def steps(self, directory):
        return checkpoint_steps(directory)

    def path(self, directory, step):
        return os.path.join(directory, self.name(step))

    def name(self, step):
        return f"ckpt-{step}"

    def verify(self, directory, step):
        verify(self.path(directory, step))

    def read(self, directory, step, target=None):
        self.verify(directory, step)
        try:
            self.checkpoint.restore(self.path(directory, step)).assert_existing_objects_matched()
        except (AssertionError, ValueError) as e:
            raise CheckpointMismatch(reason(e)) from None

    def write(self, directory, step, state=None):
        self.checkpoint.write(self.path(directory, step))

    def seal(self, directory, step):
        pass  # the index file, written last by TensorFlow, marks it complete

    def complete(self, directory, step):
        return os.path.isfile(self.path(directory, step) + ".index")

    def remove(self, directory, step):
        for name in checkpoint_steps(directory).get(step, []):
            os.unlink(os.path.join(directory, name))

    def move(self, directory, step, target):
        os.makedirs(target, exist_ok=True)
        for name in checkpoint_steps(directory).get(step, []):
            os.rename(os.path.join(directory, name), os.path.join(target, name))

    def record(self, directory, steps):
        """TensorFlow's `checkpoint` state file, with paths relative to the folder, so a copied or
        moved workdir still resolves."""
        if not steps:
            return
        lines = [f'model_checkpoint_path: "{self.name(steps[-1])}"']
        lines += [f'all_model_checkpoint_paths: "{self.name(s)}"' for s in steps]
        atomic_write(os.path.join(directory, STATE_FILE), lambda f: f.write(("\n".join(lines) + "\n").encode()))


def checkpoint_store(checkpoint, directory, keep, write_dir=None):
    """The run's `CheckpointStore` of `checkpoint` (a tf.train.Checkpoint) in `directory`; a
    non-chief worker of a multi-worker run passes its own `write_dir`."""
    return CheckpointStore(TfCheckpoints(checkpoint), directory, keep, chief=write_dir is None, write_dir=write_dir)
