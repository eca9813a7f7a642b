"""Input pipelines on tf.data: TFDS, image folders and the embedded digits set, with the paper's
augmentations and permutations. See `train_pipeline` and `eval_pipeline`."""

from keras_mixer.data.permutations import ImagePermutation, permutation_index
from keras_mixer.data.pipeline import distribute, eval_pipeline, make_pipeline, train_pipeline
from keras_mixer.data.sources import Source, digits_source, eval_split, folder_source, load_source, tfds_source

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
