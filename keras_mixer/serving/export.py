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
(data set, class names, evaluation preprocessing, pixel budget) and how it is served (precision,
frozen) for `evaluate.py` and people; TF Serving ignores that folder.

The served graph is frozen: the weights are constants inside it, not variables. That is what lets
TF's oneDNN kernels reorder each weight once, at load time, into the blocked layout of the CPU's
matrix units and fuse bias and GELU into the product (with variables they run a generic GEMM,
about 1.6x slower). `precision="bfloat16"` serves bf16 products with float32 statistics and
logits (the mixed_bfloat16 policy): several times faster on CPUs with AMX or AVX512-BF16, slower on
CPUs without them. `freeze(model)` gives the same frozen function to Python callers.
"""

import logging
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from keras_mixer.atomic_files import make_tree_readable, read_json, write_json
from keras_mixer.data.sources import JPEG_MAGIC, PNG_MAGIC
from keras_mixer.data.transforms import eval_image
from keras_mixer.model import fused_ops
from keras_mixer.model.layers import MixerBlock
from keras_mixer.model.mixer import MlpMixer
from keras_mixer.model.pixels import DEFAULT_MAX_PIXELS, EvalPreprocessing, scale_pixels
from keras_mixer.model.precisions import SERVING
from keras_mixer.model.trained_on import TrainedOn
from keras_mixer.serving import image_headers
from keras_mixer.weights_io.source_kinds import export_versions

log = logging.getLogger("keras_mixer")

METADATA = os.path.join("assets.extra", "keras_mixer.json")
# Weights are frozen into the graph up to this size (float32 bytes), which takes S and B models
# (B/16: 240 MB). Freezing holds several copies of the graph at once: exporting B/16 peaks at
# 6.4 GB of memory. L and H models (0.8 and 1.7 GB) are served with variables instead; a graph is a
# protocol buffer, which cannot exceed 2 GiB anyway.
MAX_FROZEN_BYTES = 512 * 2**20


def _has_preprocessing(model):
    return any(layer.name == "rescaling" for layer in model.layers)


def header_size(image_bytes):
    """(height, width) int64 scalars read from the header of `image_bytes` (a string scalar, an
    encoded JPEG or PNG) without decoding any pixel: `image_headers.header_size` in graph ops.

    JPEG: the SOF marker (`tf.image.extract_jpeg_shape`); PNG: the IHDR chunk's big-endian width
    and height. Anything else fails the request with an InvalidArgumentError."""
    is_png = tf.strings.substr(image_bytes, 0, len(PNG_MAGIC)) == PNG_MAGIC
    is_jpeg = tf.strings.substr(image_bytes, 0, len(JPEG_MAGIC)) == JPEG_MAGIC
    known = tf.debugging.Assert(is_png | is_jpeg, [f"the request is {image_headers.NOT_AN_IMAGE}"])
    with tf.control_dependencies([known]):
        image_bytes = tf.identity(image_bytes)

    def png():
        complete = tf.debugging.assert_greater_equal(
            tf.strings.length(image_bytes), image_headers.PNG_HEADER_BYTES, message=image_headers.TRUNCATED_PNG
        )
        with tf.control_dependencies([complete]):  # before the read, so that a short header fails with this reason
            width_height = tf.strings.substr(image_bytes, image_headers.PNG_SIZE_OFFSET, 8)
        width_height = tf.io.decode_raw(width_height, tf.int32, little_endian=False)
        return tf.cast(width_height[1], tf.int64), tf.cast(width_height[0], tf.int64)

    def jpeg():
        shape = tf.cast(tf.image.extract_jpeg_shape(image_bytes), tf.int64)
        return shape[0], shape[1]

    return tf.cond(is_png, png, jpeg)


def decode_request(image_bytes, image_size, preprocessing, max_pixels):
    """Encoded image -> float32 [H, W, 3] in [0, 255]; fails the request (InvalidArgumentError)
    if it is not a JPEG or PNG or declares more than `max_pixels` pixels."""
    height, width = header_size(image_bytes)
    too_big = tf.strings.format(
        image_headers.OVER_BUDGET + " set at export; send a smaller image",
        (width, height, tf.constant(max_pixels, tf.int64)),
    )
    check = tf.debugging.Assert(image_headers.within_budget(height, width, max_pixels), [too_big], summarize=1)
    with tf.control_dependencies([check]):
        image = tf.io.decode_image(tf.identity(image_bytes), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return eval_image(image, image_size, preprocessing)


def serving_functions(
    model, class_names=None, top_k=5, preprocessing=None, max_pixels=DEFAULT_MAX_PIXELS, forward=None
):
    """The two serving functions (bytes and uint8 tensors) -> dict of named outputs, each with its
    input signature. `preprocessing`: an `EvalPreprocessing` (or its dict), default the paper's
    centre crop. `forward`: what computes the model's output from float images [B, H, W, 3]
    (default the model itself; the frozen graph of `frozen_forward`, which both then share).
    Trace them under `fused_ops.plain_ops()`: TF Serving runs no XLA on CPUs."""
    forward = forward or (lambda images: model(images, training=False))
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
        outputs = tf.cast(forward(images), tf.float32)
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
            lambda b: decode_request(b, (height, width), preprocessing, max_pixels),
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
    model,
    export_base,
    version=None,
    class_names=None,
    top_k=5,
    preprocessing=None,
    max_pixels=DEFAULT_MAX_PIXELS,
    trained_on=None,
    precision="float32",
):
    """Writes `model` as `export_base/<version>/` for TF Serving and returns that path.

    Args:
        version: an integer; default one more than the highest existing version (1 for none).
            An existing version is an error: nothing is overwritten.
        class_names: optional list of names in label order, served as `top_k_labels`; default
            those of `trained_on`.
        top_k: how many classes the top-k outputs hold.
        preprocessing: the bytes signature's image preparation, as the model was evaluated: an
            `EvalPreprocessing` or its dict (a run's or a preset's record); default the paper's
            resize and centre crop at 0.875 (or that of `trained_on`).
        max_pixels: the bytes signature refuses images whose header declares more pixels.
        trained_on: the `TrainedOn` record of the model (data set, class names, preprocessing,
            step), recorded in `assets.extra/keras_mixer.json` with the serving settings.
        precision: "float32" or "bfloat16" (bf16 products, float32 statistics and logits; for
            CPUs with bf16 matrix units, AMX or AVX512-BF16). See `serving_model`.

    The version folder appears complete or not at all: it is written next to the target and
    renamed into place. Files and folders get the modes the umask gives (world-readable by
    default), so a server running as another user can read them.
    """
    target = _new_version_folder(export_base, version)
    trained_on = trained_on or TrainedOn()
    class_names = trained_on.class_names if class_names is None else class_names
    preprocessing = trained_on.preprocessing if preprocessing is None else _as_preprocessing(preprocessing)
    served = serving_model(model, precision)
    frozen = _weight_bytes(served) <= MAX_FROZEN_BYTES
    forward = frozen_forward(served) if frozen else None
    functions = serving_functions(
        served, class_names, top_k, preprocessing, max_pixels, forward and (lambda x: forward(x)[0])
    )
    if not frozen:
        log.info(
            "%s has %.1f GB of weights: served with variables, not frozen", model.name, _weight_bytes(served) / 1e9
        )
    served_on = trained_on.replace(
        class_names=class_names, preprocessing=preprocessing, image_size=model.input_shape[1:3]
    )
    about = dict(served_on.to_dict(), max_pixels=int(max_pixels), precision=precision, frozen=frozen)
    _write_saved_model(served if not frozen else None, functions, about, target)
    log.info("Exported SavedModel version %s to %s", os.path.basename(target), target)
    return target


def _new_version_folder(export_base, version):
    """export_base/<version> (default: one above the highest there, 1 for none), which must not
    exist yet; the base folder is made if needed."""
    export_base = os.fspath(export_base)
    if os.path.exists(export_base) and not os.path.isdir(export_base):
        raise ValueError(f"export_base {export_base!r} is a file, not a folder")
    os.makedirs(export_base, exist_ok=True)
    existing = export_versions(export_base)
    if version is None:
        version = (existing[-1] + 1) if existing else 1
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version <= 0:
        raise ValueError(f"version must be a positive integer, got {version!r}")
    target = os.path.join(export_base, str(version))
    if os.path.exists(target):
        raise ValueError(f"version {version} already exists at {target!r}; nothing was overwritten")
    return target


def _write_saved_model(variables_model, functions, about, target):
    """Writes the signatures `functions` ({name: (fn, input spec)}) and `about` (assets.extra) as a
    SavedModel at `target`, whole or not at all: staged beside it, then renamed into place.

    variables_model: None when the functions call a frozen graph (both signatures share it, so the
    weights are stored once); else the model whose variables they read (a model too large to freeze).
    """
    if variables_model is None:
        module, signatures = tf.Module(), {name: _traced(fn, spec) for name, (fn, spec) in functions.items()}
    else:
        module, signatures = keras.export.ExportArchive(), None
        module.track(variables_model)
        with fused_ops.plain_ops():
            for name, (fn, spec) in functions.items():
                module.add_endpoint(name=name, fn=fn, input_signature=spec)
    staging = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".tmp-export-")
    try:
        if signatures is not None:
            tf.saved_model.save(module, staging, signatures=signatures)
        else:
            module.write_out(staging, verbose=False)
        os.makedirs(os.path.join(staging, "assets.extra"), exist_ok=True)
        write_json(os.path.join(staging, METADATA), about)
        make_tree_readable(staging)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def serving_model(model, precision="float32"):
    """A copy of `model` that computes in `precision`, with each block's LayerNorm_1 scale and
    offset folded into the channel MLP's first Dense: LN(x) @ W + b = x_hat @ (gamma W) +
    (beta W + b), the same function with two elementwise passes fewer per block. `model` is left
    as it is.

    precision: "float32", or "bfloat16" for the mixed_bfloat16 policy (bf16 matrix products and
    activations; LayerNorm statistics, pooling and logits in float32)."""
    if precision not in SERVING:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(SERVING)}")
    if not isinstance(model, MlpMixer):
        raise ValueError(f"only an MlpMixer can be prepared for serving, got {type(model).__name__} {model.name!r}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(SERVING[precision])
    try:
        served = MlpMixer.from_config(model.get_config())
    finally:
        keras.config.set_dtype_policy(previous)
    served.set_weights(model.get_weights())
    for block in served.layers:
        if isinstance(block, MixerBlock) and not block.channel_mixing.dense_0.quantization_mode:
            _fold_layer_norm(block.layer_norm_1, block.channel_mixing.dense_0)
    return served


def _fold_layer_norm(norm, dense):
    """Moves `norm`'s scale and offset into the `dense` layer it feeds (computed in float64)."""
    gamma, beta, kernel, bias = (
        np.asarray(v.numpy(), np.float64) for v in (norm.gamma, norm.beta, dense.kernel, dense.bias)
    )
    dense.kernel.assign((gamma[:, None] * kernel).astype(dense.kernel.dtype))
    dense.bias.assign((beta @ kernel + bias).astype(dense.bias.dtype))
    norm.gamma.assign(np.ones_like(gamma, norm.gamma.dtype))
    norm.beta.assign(np.zeros_like(beta, norm.beta.dtype))


def _weight_bytes(model):
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)


def _traced(fn, signature):
    """`fn` as a concrete function of `signature`, traced with no XLA-compiled piece in it."""
    with fused_ops.plain_ops():
        return tf.function(fn, input_signature=signature).get_concrete_function()


def frozen_forward(model):
    """`model`'s inference as one TF graph whose weights are constants: a concrete function of
    float images [None, H, W, channels] -> [the model's output] (a list of one tensor)."""
    traced = _traced(
        lambda images: model(images, training=False), [tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)]
    )
    return convert_variables_to_constants_v2(traced)


class FrozenModel:
    """A Mixer classifier frozen for fast inference on a CPU: its weights are constants of one TF
    graph (see the module docstring), in float32 or bfloat16.

        fast = keras_mixer.freeze(model, "bfloat16")
        logits = fast.predict(images)          # images [N, H, W, 3] in [0, 255] -> [N, classes] float32

    It is a snapshot: weights changed in `model` afterwards are not seen; freeze again.
    """

    def __init__(self, model, precision="float32"):
        served = serving_model(model, precision)
        self.precision = precision
        self.input_shape, self.output_shape = tuple(model.input_shape[1:]), tuple(model.output_shape[1:])
        self._call = frozen_forward(served)

    def __call__(self, images):
        """images [B, H, W, 3] float (the model's own input) -> the model's output [B, classes], float32."""
        return tf.cast(self._call(tf.convert_to_tensor(images, tf.float32))[0], tf.float32)

    def predict(self, images, batch_size=32):
        """Like `keras.Model.predict`: NumPy in, NumPy [N, classes] out, `batch_size` images per call."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise ValueError(f"images must be [N, {', '.join(map(str, self.input_shape))}], got shape {images.shape}")
        batches = [self(images[i : i + batch_size]).numpy() for i in range(0, len(images), batch_size)]
        return np.concatenate(batches) if batches else np.zeros((0, *self.output_shape), np.float32)


def freeze(model, precision="float32"):
    """`model` (an MlpMixer) frozen for inference: a `FrozenModel` (`keras_mixer.freeze`)."""
    return FrozenModel(model, precision)


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
    with fused_ops.plain_ops():
        model.export(path, format="onnx", verbose=False, input_signature=signature)
    return path
