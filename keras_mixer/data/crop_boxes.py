"""The augmentations' parameters and geometry, defined once for both readers: the tf.data
pipeline (`transforms`) and the NumPy/Pillow reader (`arrays`). Standard library and NumPy only, so
the reader needs no TensorFlow.

    training:   AREA_RANGE, ASPECT_RATIO_RANGE, MAX_ATTEMPTS of the Inception crop, and
                `inception_crop_box`: TensorFlow's crop sampler as a function of uniform numbers
                (the NumPy reader's crops; tf.data keeps the op itself, see
                `transforms.inception_crop_box`)
    evaluation: `eval_geometry`, the resized size and centre-crop window of an image, written with
                operators and the few functions of an `ArrayOps`, so that the same lines compute
                it on NumPy numbers and on the tensors of a tf.data graph (any image size)

tests/test_readers_agree.py checks that the two readers give the same evaluation images and the
same distribution of training crops.
"""

import math
from typing import Callable, NamedTuple

import numpy as np

# The Inception crop of the official pipeline: an area share and an aspect ratio (width / height),
# up to MAX_ATTEMPTS draws of them before the whole image is taken.
AREA_RANGE = (0.05, 1.0)
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
MAX_ATTEMPTS = 10
# Uniform numbers per crop attempt: aspect ratio, height, top offset, left offset.
DRAWS_PER_ATTEMPT = 4
# The kernel's float 1e-7, in the double arithmetic of its widest fitting height.
_EPSILON = float(np.float32(1e-7))


# --- evaluation -----------------------------------------------------------------------------------


class ArrayOps(NamedTuple):
    """What `eval_geometry` computes with besides operators, for one kind of number."""

    to_float32: Callable  # an image's (h, w) -> float32 [2]
    to_int: Callable  # float32 [2] of whole numbers -> ints [2]
    maximum: Callable  # elementwise
    round: Callable  # half to even (np.round, tf.round)


NUMPY_OPS = ArrayOps(lambda shape: np.asarray(shape, np.float32), lambda x: x.astype(np.int64), np.maximum, np.round)


def eval_geometry(image_shape, image_size, preprocessing, ops=NUMPY_OPS):
    """(resized size, window) of the evaluation view of an image of `image_shape` (h, w, ...): the
    image is resized to the resized size [2] (H', W'), and the view is the window (top, left, H, W)
    of that; window None: the whole resized image, then `image_size` (H, W) itself.

    `preprocessing` (an `EvalPreprocessing`) says how:
    "crop": scaled so it covers image_size / crop_ratio, aspect kept, each side rounded half to
        even and at least the target's; then the centred (H, W) window (an odd margin's extra pixel
        on the bottom / right).
    "resize": the whole image squeezed to (H, W).

    In float32, as the tf.data graph has always computed it: (size / ratio), a Python float, made
    float32 by the division by the float32 side, and the rounding of side * scale decides the
    resized size (float64 would resize some images one pixel apart).

    ops: NUMPY_OPS for a shape of ints (int64 results), or `transforms.TENSOR_OPS` for tf.shape in a
        graph (int32 tensors).
    """
    height, width = image_size
    if preprocessing.eval_resize == "resize":
        return image_size, None
    shape = ops.to_float32(image_shape[:2])
    ratio = preprocessing.crop_ratio
    scale = ops.maximum(height / ratio / shape[0], width / ratio / shape[1])
    resized = ops.maximum(ops.to_int(ops.round(shape * scale)), [height, width])
    return resized, ((resized[0] - height) // 2, (resized[1] - width) // 2, height, width)


# --- the Inception crop ---------------------------------------------------------------------------


def _uniform_int(u, n):
    """An int in [0, n) from a uniform u in [0, 1) (min: u * n may round up to n)."""
    return min(int(u * n), n - 1)


def _lrintf(value):
    """A float32 rounded half to even to an int, as lrintf in the default rounding mode (rounded as
    a Python float: NumPy's own round of a float32 scalar takes ten times as long)."""
    return round(float(value))


def _crop_attempt(image_h, image_w, min_area, max_area, aspect, u_height, u_top, u_left):
    """One attempt of TensorFlow's sample_distorted_bounding_box (GenerateRandomCrop, with no
    object boxes and min_object_covered 0): (top, left, height, width), or None when the sampled
    aspect ratio gives no box with an area in [min_area, max_area] (px, float32).

    The crop's height is uniform between the heights of the smallest and the largest area at this
    aspect ratio (capped to fit), its width the rounded height * aspect; the offsets are as TF
    draws them (uniform in [0, side - crop side), so a crop shorter than the image never touches its
    bottom or right edge: TF's own off-by-one, kept so both pipelines crop alike).

    In float32 where the kernel computes in float (`aspect` is a float32): the bounds decide which
    boxes pass (at 64 x 200 px and an area share of 0.3, float32's 3840.0002 px rejects the
    60 x 64 box that float64's 3840 accepts)."""
    # A float32 square root is the float64 one rounded to float32 (53 bits hold 2 * 24 + 2).
    height = _lrintf(np.float32(math.sqrt(min_area / aspect)))
    max_height = _lrintf(np.float32(math.sqrt(max_area / aspect)))
    if _lrintf(max_height * aspect) > image_w:  # the largest box is too wide: the tallest that fits
        max_height = int((image_w + 0.5 - _EPSILON) / float(aspect))  # in double, as the kernel
        if _lrintf(max_height * aspect) > image_w:
            max_height -= 1
    max_height = min(max_height, image_h)
    height = min(height, max_height)
    if height < max_height:
        height += _uniform_int(u_height, max_height - height + 1)
    width = _lrintf(height * aspect)
    area = np.float32(width * height)
    # TF's repairs of rounding: one pixel taller when too small, one shorter when too large.
    if area < min_area:
        height += 1
        width = _lrintf(height * aspect)
        area = np.float32(width * height)
    if area > max_area:
        height -= 1
        width = _lrintf(height * aspect)
        area = np.float32(width * height)
    if area < min_area or area > max_area or not (0 < width <= image_w and 0 < height <= image_h):
        return None
    top = _uniform_int(u_top, image_h - height) if height < image_h else 0
    left = _uniform_int(u_left, image_w - width) if width < image_w else 0
    return top, left, height, width


def inception_crop_box(image_shape, uniforms, area_range=AREA_RANGE, aspect_ratio_range=ASPECT_RATIO_RANGE):
    """(top, left, height, width) of a random crop of an image of `image_shape` (h, w, ...), as
    `transforms.inception_crop_box` samples it: an area share in `area_range`, an aspect ratio
    (width / height) uniform in `aspect_ratio_range`, up to MAX_ATTEMPTS attempts, the whole image
    when none fits.

    uniforms: float [MAX_ATTEMPTS, DRAWS_PER_ATTEMPT] in [0, 1): each attempt's aspect ratio,
        height, top and left draws (a fixed count, so a stream's random numbers do not depend on
        its images).
    Returns Python ints; the box lies inside the image."""
    image_h, image_w = int(image_shape[0]), int(image_shape[1])
    # float32 as the kernel's: its attributes, (share * width) * height, the aspect ratio.
    min_area, max_area = (np.float32(share) * np.float32(image_w) * np.float32(image_h) for share in area_range)
    low, high = np.float32(aspect_ratio_range[0]), np.float32(aspect_ratio_range[1])
    for u_aspect, u_height, u_top, u_left in np.asarray(uniforms).tolist():
        aspect = np.float32(u_aspect) * (high - low) + low
        box = _crop_attempt(image_h, image_w, min_area, max_area, aspect, u_height, u_top, u_left)
        if box is not None:
            return box
    return 0, 0, image_h, image_w
