"""Exporting a Mixer for serving: TF Serving SavedModels (image bytes and tensors) and ONNX.

TF Serving layout: `export_base/<version>/saved_model.pb + variables/`, versions are integers and
an existing version is never overwritten. Two signatures:

  serving_default   image_bytes: string [batch]   encoded JPEG/PNG, any size and channel count;
                    decoded, resized (shorter side, centre crop) inside the graph
  serving_images    images: uint8 [batch, H, W, 3] at the model's size

Both return `logits` [batch, classes], `probabilities`, `top_k_ids` int32 [batch, k],
`top_k_scores` [batch, k], and `top_k_labels` string [batch, k] when class names are given.
"""

import logging
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_mixer.data.transforms import resize_and_center_crop

log = logging.getLogger("keras_mixer")


def _versions(export_base):
    return sorted(int(d) for d in os.listdir(export_base) if d.isdigit())


def _has_preprocessing(model):
    return any(layer.name == "rescaling" for layer in model.layers)


def _decode(image_bytes, image_size, crop_ratio):
    """Encoded image -> float32 [H, W, 3] in [0, 255]; fails the request if not an image."""
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return resize_and_center_crop(tf.cast(image, tf.float32), image_size, crop_ratio)


def serving_functions(model, class_names=None, top_k=5, crop_ratio=0.875):
    """The two serving functions (bytes and uint8 tensors) -> dict of named outputs."""
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
            images = (images - 127.5) / 127.5
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
            lambda b: _decode(b, (height, width), crop_ratio),
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


def export_saved_model(model, export_base, version=None, class_names=None, top_k=5, crop_ratio=0.875):
    """Writes `model` as `export_base/<version>/` for TF Serving and returns that path.

    Args:
        version: an integer; default one more than the highest existing version (1 for none).
            An existing version is an error: nothing is overwritten.
        class_names: optional list of names in label order, served as `top_k_labels`.
        top_k: how many classes the top-k outputs hold.
        crop_ratio: the bytes signature resizes the shorter side to size / ratio, then centre-crops.

    The version folder appears complete or not at all: it is written next to the target and
    renamed into place.
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
    for name, (fn, signature) in serving_functions(model, class_names, top_k, crop_ratio).items():
        archive.add_endpoint(name=name, fn=fn, input_signature=signature)
    staging = tempfile.mkdtemp(dir=export_base, prefix=".tmp-export-")
    try:
        archive.write_out(staging, verbose=False)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("Exported SavedModel version %d to %s", version, target)
    return target


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
