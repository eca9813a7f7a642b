"""Input pipelines on tf.data: TFDS, image folders and the embedded digits set, with the paper's
augmentations and permutations. See `train_pipeline` and `eval_pipeline`; `arrays` batches the
digits and image folders with NumPy and Pillow where TensorFlow is not installed.

The sources import TensorFlow only when a tf.data stream is asked for, and the pipelines only when
first used, so `from keras_mixer import data` works on a machine with JAX alone."""

import importlib

from keras_mixer.data.sources import Source, digits_source, eval_split, folder_source, load_source, tfds_source

_LAZY = {
    "ImagePermutation": "permutations",
    "permutation_index": "permutations",
    "distribute": "pipeline",
    "eval_pipeline": "pipeline",
    "make_pipeline": "pipeline",
    "train_pipeline": "pipeline",
}

__all__ = [
    "ImagePermutation",
    "Source",
    "digits_source",
    "distribute",
    "eval_pipeline",
    "eval_split",
    "folder_source",
    "load_source",
    "make_pipeline",
    "permutation_index",
    "tfds_source",
    "train_pipeline",
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"keras_mixer.data.{_LAZY[name]}"), name)
    if name in ("arrays", "crop_boxes", "permutations", "pipeline", "transforms"):
        return importlib.import_module(f"keras_mixer.data.{name}")
    raise AttributeError(f"module 'keras_mixer.data' has no attribute {name!r}")
