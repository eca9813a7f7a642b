"""Per-image transforms of the official pipeline, as TensorFlow graph functions for tf.data.

Images are [h, w, 3] (uint8 or float in [0, 255]); outputs are float32 [H, W, 3] in [0, 255]
unless `rescale_to_unit_range` is applied. Random transforms take a stateless seed (int32 [2]),
so a pipeline with a fixed seed is reproducible. The augmentations' parameters and the evaluation
geometry come from `crop_boxes`, which the NumPy reader (`arrays`) shares.
"""

import keras
import tensorflow as tf

from keras_mixer.data.crop_boxes import AREA_RANGE, ASPECT_RATIO_RANGE, MAX_ATTEMPTS, ArrayOps, eval_geometry
from keras_mixer.model.pixels import EvalPreprocessing, scale_pixels

# `crop_boxes.eval_geometry` on tf.shape in a graph: int32 tensors.
TENSOR_OPS = ArrayOps(lambda shape: tf.cast(shape, tf.float32), lambda x: tf.cast(x, tf.int32), tf.maximum, tf.round)


def inception_crop_box(image_shape, seed, area_range=AREA_RANGE, aspect_ratio_range=ASPECT_RATIO_RANGE):
    """A random crop box (begin int32 [3], size int32 [3]) covering `area_range` of the image at an
    aspect ratio in `aspect_ratio_range`; the whole image when no box fits within MAX_ATTEMPTS
    attempts (as the official Inception crop).

    The sampler that `crop_boxes.inception_crop_box` computes for the NumPy reader, but TensorFlow's
    op itself: it draws its uniform numbers from its own Philox stream of `seed`, inside the
    kernel, where no other code takes them from. Computing the box from other draws would change
    every crop of the tf.data stream, and a training run written before would resume to other
    weights than its uninterrupted run reached. tests/test_readers_agree.py checks that the two
    draw from one distribution."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        seed=seed,
        min_object_covered=0.0,
        aspect_ratio_range=aspect_ratio_range,
        area_range=area_range,
        max_attempts=MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def inception_crop(image, image_size, seed, area_range=AREA_RANGE):
    """Random-area crop, resized (bilinear) to `image_size` (H, W). Returns float32 [H, W, 3]."""
    begin, size = inception_crop_box(tf.shape(image), seed, area_range)
    crop = tf.slice(image, begin, size)
    return tf.image.resize(crop, image_size, method="bilinear")


def random_flip(image, seed):
    return tf.image.stateless_random_flip_left_right(image, seed)


def _resize(image, size, interpolation):
    """tf.image.resize; bicubic's overshoot is clipped to [0, 255], as an 8-bit picture resized
    bicubically (timm's evaluation) holds it."""
    resized = tf.image.resize(image, size, method=interpolation)
    return resized if interpolation == "bilinear" else tf.clip_by_value(resized, 0.0, 255.0)


def resize_and_center_crop(image, image_size, crop_ratio=0.875, interpolation="bilinear"):
    """Evaluation: resize so the image covers `image_size / crop_ratio`, keeping its aspect ratio
    (for a square target: the shorter side to size / ratio, e.g. 256 for 224), then take the
    centred `image_size` crop. Returns float32 [H, W, 3]."""
    return eval_image(image, image_size, EvalPreprocessing("crop", crop_ratio, interpolation))


def plain_resize(image, image_size, interpolation="bilinear"):
    """Evaluation without cropping: the whole image squeezed to `image_size` (Table 2 style)."""
    return _resize(image, image_size, interpolation)


def eval_image(image, image_size, preprocessing):
    """An image [h, w, 3] of any size -> float32 [H, W, 3] as `preprocessing` (an
    `EvalPreprocessing`) says: resized and cropped to the size and window of
    `crop_boxes.eval_geometry`, computed on the image's dynamic shape. The one evaluation transform
    of the data pipeline and the serving signature."""
    resized_size, window = eval_geometry(tf.shape(image), image_size, preprocessing, TENSOR_OPS)
    resized = _resize(image, resized_size, preprocessing.interpolation)
    if window is None:
        return resized
    top, left, height, width = window
    return tf.slice(resized, [top, left, 0], [height, width, 3])


def rescale_to_unit_range(image):
    """[0, 255] -> [-1, 1], the models' own scaling, for models built without it."""
    return scale_pixels(tf.cast(image, tf.float32))


def randaugment_layer(magnitude, seed=None, num_ops=2):
    """Keras 3 RandAugment with the paper's 2 layers; the paper's magnitude m (10, 15, 20 on the
    RandAugment 0-30 scale) becomes Keras' normalised factor m / 30."""
    if not 0 <= magnitude <= 30:
        raise ValueError(f"RandAugment magnitude must be in [0, 30], got {magnitude!r}")
    # float32 whatever the global policy: under mixed_bfloat16 the layer would otherwise compute in
    # bfloat16 on float32 images (the input pipeline is float32; the model casts for itself).
    return keras.layers.RandAugment(
        value_range=(0, 255), num_ops=num_ops, factor=magnitude / 30.0, seed=seed, dtype="float32"
    )


def mixup_layer(alpha, seed=None):
    """Keras 3 MixUp: each image mixed with another of the batch, weight ~ Beta(alpha, alpha);
    one-hot labels mixed with the same weight."""
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be positive, got {alpha!r}")
    return keras.layers.MixUp(alpha=alpha, seed=seed, dtype="float32")  # as RandAugment: not the global policy
