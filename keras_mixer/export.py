"""Exporting a Mixer for serving: TF Serving SavedModels (image bytes and tensors) and ONNX.

TF Serving layout: `export_base/<version>/saved_model.pb + variables/`, versions are integers and
an existing version is never overwritten. Two signatures:

  serving_default   image_bytes: string [batch]   encoded JPEG/PNG, any size and channel count;
                    the header's width x height is checked against a pixel budget before any
                    pixel is decoded; then decoded and resized (shorter side and centre crop, or
                    plain resize, as the model was evaluated) inside the graph
  serving_images    images: uint8 [batch, H, W, 3] at the model's size

Both return `logits` [batch, classes], `probabilities`, `top_k_ids` int32 [batch, k],
`top_k_scores` [batch, k], and `top_k_labels` string [batch, k] when class names are given.

Beside the SavedModel, `assets.extra/keras_mixer.json` records what the model was trained on
(data set, class names, evaluation preprocessing, pixel budget) for `evaluate.py` and people;
TF Serving ignores that folder.
"""

import logging
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_mixer.data.transforms import eval_image
from keras_mixer.files import make_tree_readable, read_json, write_json
from keras_mixer.preprocessing import EvalPreprocessing, scale_pixels

log = logging.getLogger("keras_mixer")

# The bytes signature refuses images with more pixels than this (width x height from the header),
# before decoding: 40 megapixels (e.g. 8000 x 5000) decode to 120 MB of uint8 pixels. Without a
# bound, one 379 KB PNG declaring 20000 x 20000 pixels takes a server to 10 GB.
DEFAULT_MAX_PIXELS = 40_000_000
METADATA = os.path.join("assets.extra", "keras_mixer.json")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def _versions(export_base):
    return sorted(int(d) for d in os.listdir(export_base) if d.isdigit())


def _has_preprocessing(model):
    return any(layer.name == "rescaling" for layer in model.layers)


def header_size(image_bytes):
    """(height, width) int64 read from a JPEG or PNG header without decoding any pixel.

    JPEG: the SOF marker (`tf.image.extract_jpeg_shape`); PNG: the IHDR chunk, big-endian width and
    height at bytes 16..24. Anything else fails the request with an InvalidArgumentError."""
    is_png = tf.strings.substr(image_bytes, 0, 8) == _PNG_MAGIC
    is_jpeg = tf.strings.substr(image_bytes, 0, 3) == _JPEG_MAGIC
    known = tf.debugging.Assert(is_png | is_jpeg, ["the request is not a JPEG or PNG image"])
    with tf.control_dependencies([known]):
        image_bytes = tf.identity(image_bytes)

    def png():
        tf.debugging.assert_greater_equal(
            tf.strings.length(image_bytes), 24, message="truncated PNG: no complete IHDR header"
        )
        width_height = tf.io.decode_raw(tf.strings.substr(image_bytes, 16, 8), tf.int32, little_endian=False)
        return tf.cast(width_height[1], tf.int64), tf.cast(width_height[0], tf.int64)

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(image_bytes), tf.int64)
        return shape[0], shape[1]

    return tf.cond(is_png, png, jpeg)


def _decode(image_bytes, image_size, preprocessing, max_pixels):
    """Encoded image -> float32 [H, W, 3] in [0, 255]; fails the request (InvalidArgumentError)
    if it is not a JPEG or PNG or declares more than `max_pixels` pixels."""
    height, width = header_size(image_bytes)
    too_big = tf.strings.format(
        "image of {}x{} pixels (width x height) is over the pixel budget of {} pixels set at export; send a smaller image",
        (width, height, tf.constant(max_pixels, tf.int64)),
    )
    check = tf.debugging.Assert(
        (height > 0) & (width > 0) & (height * width <= max_pixels), [too_big], summarize=1
    )
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(tf.identity(image_bytes), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return eval_image(image, image_size, preprocessing)


def serving_functions(model, class_names=None, top_k=5, preprocessing=None, max_pixels=DEFAULT_MAX_PIXELS):
    """The two serving functions (bytes and uint8 tensors) -> dict of named outputs.
    `preprocessing`: an `EvalPreprocessing` (or its dict), default the paper's centre crop."""
    preprocessing = _as_preprocessing(preprocessing)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if len(model.output_shape) != 2 or not any(layer.name == "head" for layer in model.layers):
        raise ValueError(
            f"Only classifiers can be served: model {model.name!r} has output shape {model.output_shape} "
            f"and no head (build it with include_top=True)"
        )
    height, width = model.input_shape[1:3]
    classes = model.output_shape[-1]
    k = min(top_k, classes)
    scale_inside = _has_preprocessing(model)
    # The model's head may end in softmax or output logits: serve both either way.
    activation = keras.activations.serialize(model.get_layer("head").activation)
    if activation not in ("linear", "softmax"):
        raise ValueError(f"Cannot export a head with activation {activation!r}; use softmax or none")
    if class_names is not None and len(class_names) != classes:
        raise ValueError(f"{len(class_names)} class names given for a model with {classes} classes")
    labels = tf.constant(list(class_names)) if class_names is not None else None

    def predict(images):
        images = tf.cast(images, tf.float32)
        if not scale_inside:
            images = scale_pixels(images)
        outputs = tf.cast(model(images, training=False), tf.float32)
        if activation == "softmax":
            probabilities = outputs
            logits = tf.math.log(tf.maximum(probabilities, 1e-30))
        else:
            logits, probabilities = outputs, tf.nn.softmax(outputs)
        scores, ids = tf.math.top_k(probabilities, k=k)
        result = dict(logits=logits, probabilities=probabilities, top_k_ids=ids, top_k_scores=scores)
        if labels is not None:
            result["top_k_labels"] = tf.gather(labels, ids)
        return result

    def from_bytes(image_bytes):
        images = tf.map_fn(
            lambda b: _decode(b, (height, width), preprocessing, max_pixels),
            image_bytes,
            fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32),
        )
        return predict(images)

    def from_images(images):
        return predict(images)

    signatures = dict(
        serving_default=(from_bytes, [tf.TensorSpec([None], tf.string, name="image_bytes")]),
        serving_images=(from_images, [tf.TensorSpec([None, height, width, 3], tf.uint8, name="images")]),
    )
    return signatures


def export_saved_model(
    model, export_base, version=None, class_names=None, top_k=5, preprocessing=None, max_pixels=DEFAULT_MAX_PIXELS,
    metadata=None,
):  # fmt: skip
    """Writes `model` as `export_base/<version>/` for TF Serving and returns that path.

    Args:
        version: an integer; default one more than the highest existing version (1 for none).
            An existing version is an error: nothing is overwritten.
        class_names: optional list of names in label order, served as `top_k_labels`.
        top_k: how many classes the top-k outputs hold.
        preprocessing: the bytes signature's image preparation, as the model was evaluated: an
            `EvalPreprocessing` or its dict (a run's or a preset's record); default the paper's
            resize and centre crop at 0.875.
        max_pixels: the bytes signature refuses images whose header declares more pixels.
        metadata: a dict recorded in `assets.extra/keras_mixer.json` (data set, ...).

    The version folder appears complete or not at all: it is written next to the target and
    renamed into place. Files and folders get the modes the umask gives (world-readable by
    default), so a server running as another user can read them.
    """
    export_base = os.fspath(export_base)
    if os.path.exists(export_base) and not os.path.isdir(export_base):
        raise ValueError(f"export_base {export_base!r} is a file, not a folder")
    os.makedirs(export_base, exist_ok=True)
    existing = _versions(export_base)
    if version is None:
        version = (existing[-1] + 1) if existing else 1
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version <= 0:
        raise ValueError(f"version must be a positive integer, got {version!r}")
    target = os.path.join(export_base, str(version))
    if os.path.exists(target):
        raise ValueError(f"version {version} already exists at {target!r}; nothing was overwritten")

    archive = keras.export.ExportArchive()
    archive.track(model)
    preprocessing = _as_preprocessing(preprocessing)
    functions = serving_functions(model, class_names, top_k, preprocessing, max_pixels)
    for name, (fn, signature) in functions.items():
        archive.add_endpoint(name=name, fn=fn, input_signature=signature)
    about = dict(metadata or {}, class_names=class_names, **preprocessing.to_dict(), max_pixels=int(max_pixels),
                 image_size=list(model.input_shape[1:3]))  # fmt: skip
    staging = tempfile.mkdtemp(dir=export_base, prefix=".tmp-export-")
    try:
        archive.write_out(staging, verbose=False)
        os.makedirs(os.path.join(staging, "assets.extra"), exist_ok=True)
        write_json(os.path.join(staging, METADATA), about)
        make_tree_readable(staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("Exported SavedModel version %d to %s", version, target)
    return target


def _as_preprocessing(preprocessing):
    if isinstance(preprocessing, EvalPreprocessing):
        return preprocessing
    return EvalPreprocessing.from_dict(preprocessing)


def export_metadata(saved_model_dir):
    """The `assets.extra/keras_mixer.json` record of an export, or {} when it has none."""
    return read_json(os.path.join(saved_model_dir, METADATA)) or {}


def export_onnx(model, path):
    """Writes `model` as ONNX (Keras 3 `model.export(format="onnx")`); input float [batch, H, W, 3]
    as the model takes it, output the model's output."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"ONNX path {path!r} is a folder; give a file name")
    # An explicit signature: Keras only infers one for models that were already called.
    signature = [tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="images")]
    model.export(path, format="onnx", verbose=False, input_signature=signature)
    return path
