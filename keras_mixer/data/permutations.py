"""The input permutations of the paper's invariance study (section 3.4).

  "patches": the patch order is shuffled and one within-patch pixel permutation is applied to
             every patch; a Mixer is exactly invariant to this (a token permutation).
  "pixels":  one global permutation of all pixel positions.

Each is fixed by a seed, so every image, train and test, gets the same permutation. Both are a
gather of pixel positions; channels stay together.
"""

import numpy as np
import tensorflow as tf

from keras_mixer.argument_checks import check_image_size, to_pair

KINDS = ("patches", "pixels")


def patch_shuffle(image_size, patch_size, seed=0):
    """(patch_order int [S], pixel_order int [P_h * P_w]) of the "patches" permutation: output
    token i (row-major) takes input patch patch_order[i], and inside every patch output pixel j
    takes input pixel pixel_order[j]. A Mixer trained on such images is the same Mixer with its
    stem kernel and token-mixing weights relabelled (see `keras_mixer.studies.permutation`)."""
    height, width = to_pair("image_size", image_size)
    if patch_size is None:
        raise ValueError("the 'patches' permutation needs the model's patch_size")
    ph, pw = to_pair("patch_size", patch_size)
    check_image_size((height, width), (ph, pw))
    rng = np.random.default_rng(seed)
    return rng.permutation((height // ph) * (width // pw)), rng.permutation(ph * pw)


def permutation_index(kind, image_size, patch_size=None, seed=0):
    """int array [H * W]: output pixel i (row-major) takes input pixel index[i]."""
    height, width = to_pair("image_size", image_size)
    if kind == "pixels":
        return np.random.default_rng(seed).permutation(height * width)
    if kind != "patches":
        raise ValueError(f"permutation must be one of {KINDS}, got {kind!r}")
    patch_order, pixel_order = patch_shuffle((height, width), patch_size, seed)
    ph, pw = to_pair("patch_size", patch_size)
    grid_w = width // pw
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    patch = patch_order[(rows // ph) * grid_w + cols // pw]  # source patch of each output pixel
    pixel = pixel_order[(rows % ph) * pw + cols % pw]  # source position inside that patch
    source_rows = (patch // grid_w) * ph + pixel // pw
    source_cols = (patch % grid_w) * pw + pixel % pw
    return (source_rows * width + source_cols).reshape(-1)


class ImagePermutation:
    """Applies (or undoes) one fixed pixel permutation to images [..., H, W, C] (NumPy or tf)."""

    def __init__(self, kind, image_size, patch_size=None, seed=0):
        self.kind, self.seed = kind, seed
        self.image_size = to_pair("image_size", image_size)
        self.patch_size = to_pair("patch_size", patch_size) if patch_size is not None else None
        self.index = permutation_index(kind, self.image_size, patch_size, seed)
        self.inverse_index = np.argsort(self.index)

    def _gather(self, images, index):
        height, width = self.image_size
        images = tf.convert_to_tensor(images)
        shape = tf.shape(images)
        flat = tf.reshape(images, tf.concat([shape[:-3], [height * width], shape[-1:]], axis=0))
        return tf.reshape(tf.gather(flat, index, axis=flat.shape.rank - 2), shape)

    def __call__(self, images):
        return self._gather(images, self.index)

    def invert(self, images):
        return self._gather(images, self.inverse_index)
