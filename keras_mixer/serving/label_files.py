"""Labelling image files with a trained model: what `trainers/predict.py` runs.

Each file goes the way a request to the TF Serving export goes: its JPEG or PNG header is checked
against the pixel budget before any pixel is decoded (`image_headers`), then it is decoded to RGB
and prepared as the model was evaluated (`EvalPreprocessing`: centre crop or plain resize to the
model's size). With TensorFlow installed that is the export's own decode function
(`export.decode_request`); without it (Keras' JAX backend alone), Pillow and
`data.arrays.eval_image`, which compute the same pixels for PNGs (JPEGs differ by about one grey
level: TensorFlow decodes them with libjpeg's fast integer transform). A file that fails any of
this is named with the reason and skipped; the others are labelled in batches.
"""

import dataclasses
import os
from typing import Optional

import numpy as np

from keras_mixer.data.sources import tensorflow_installed
from keras_mixer.model.pixels import DEFAULT_MAX_PIXELS, scale_pixels
from keras_mixer.serving.image_headers import check_budget, header_size


@dataclasses.dataclass
class Labelled:
    """One file's result: its `top` [(label, score)] best first, or the `error` that skipped it."""

    path: str
    top: Optional[list] = None
    error: Optional[str] = None


def image_files(paths):
    """(files, missing): the files named in `paths` and, for folders, every file under them
    (recursively, sorted; hidden ones left out), each once, in the order given; and the paths that
    do not exist. A folder's files are all kept whatever their names: one that is not an image is
    then named with the reason it was skipped, not passed over in silence."""
    files, missing, seen = [], [], set()
    for path in paths:
        if os.path.isdir(path):
            found = []
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
                found += [os.path.join(folder, n) for n in sorted(names) if not n.startswith(".")]
        elif os.path.isfile(path):
            found = [path]
        else:
            missing.append(path)
            continue
        for file in found:
            if file not in seen:
                seen.add(file)
                files.append(file)
    return files, missing


def pillow_decoder(image_size, preprocessing, max_pixels):
    """bytes -> float32 [H, W, 3] in [0, 255], without TensorFlow; ValueError naming the reason."""
    import io

    from PIL import Image

    from keras_mixer.data.arrays import eval_image

    def decode(data):
        check_budget(*header_size(data), max_pixels)
        try:
            with Image.open(io.BytesIO(data)) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"does not decode ({e})") from None
        return eval_image(pixels, image_size, preprocessing)

    return decode


def tensorflow_decoder(image_size, preprocessing, max_pixels):
    """The export's decode of one request (`export.decode_request`), as a function of bytes;
    ValueError naming the reason."""
    import tensorflow as tf

    from keras_mixer.serving.export import decode_request  # the serving signature's own decode

    decode_one = tf.function(
        lambda data: decode_request(data, image_size, preprocessing, max_pixels),
        input_signature=[tf.TensorSpec([], tf.string)],
    )

    def decode(data):
        check_budget(*header_size(data), max_pixels)  # the graph's checks too, for a one-line reason
        try:
            return decode_one(tf.constant(data)).numpy()
        except tf.errors.InvalidArgumentError as e:
            raise ValueError(f"does not decode ({e.message.splitlines()[0][:200]})") from None

    return decode


def make_decoder(image_size, preprocessing, max_pixels=DEFAULT_MAX_PIXELS):
    """The serving decode where TensorFlow is installed, else the Pillow one."""
    make = tensorflow_decoder if tensorflow_installed() else pillow_decoder
    return make(tuple(image_size), preprocessing, max_pixels)


def label_files(files, scores_of, decode, class_names, top_k=5, batch_size=64, progress=None):
    """Yields a `Labelled` per file, in order.

    Args:
        scores_of: a list of what `decode` returned, one per image -> class probabilities
            [B, classes].
        decode: a file's bytes -> what `scores_of` takes (float32 [H, W, 3] in [0, 255], or the
            checked bytes for a SavedModel), ValueError for a file it refuses.
        class_names: the labels in class order, or None (labels are then the class ids).
        progress: called with the number of files done after each batch.
    """
    done = 0
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        results, images, kept = [], [], []
        for path in chunk:
            try:
                with open(path, "rb") as f:
                    images.append(decode(f.read()))
                kept.append(len(results))
                results.append(Labelled(path))
            except (OSError, ValueError) as e:
                results.append(Labelled(path, error=str(e)))
        if images:
            scores = np.asarray(scores_of(images), dtype=np.float32)
            k = min(top_k, scores.shape[-1])
            best = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
            for row, position in enumerate(kept):
                names = [class_names[i] if class_names else str(i) for i in best[row]]
                results[position].top = list(zip(names, (float(scores[row, i]) for i in best[row])))
        done += len(chunk)
        if progress is not None:
            progress(done)
        yield from results


@dataclasses.dataclass
class Labeller:
    """What `label_files` needs of a model: `scores_of`, `decode`, the class names, and where the
    model came from."""

    scores_of: object
    decode: object
    class_names: Optional[tuple]
    image_size: tuple


def open_labeller(source):
    """A `Labeller` for any source the package opens: a SavedModel (its bytes signature, as TF
    Serving runs it, with the pixel budget and preprocessing it records) or a Keras source (a
    workdir, .keras, checkpoint, preset or weights file, with what it records)."""
    from keras_mixer.weights_io import source_kinds

    found = source_kinds.resolve(source)
    if found.kind == "export":
        return _export_labeller(found.path)
    import keras

    from keras_mixer.serving.trained_models import load_keras_model

    model, trained_on = load_keras_model(found)
    size = tuple(model.input_shape[1:3])
    softmax = keras.activations.serialize(model.get_layer("head").activation) == "softmax"
    scaled_inside = any(layer.name == "rescaling" for layer in model.layers)  # as the export decides

    def scores_of(images):
        images = np.stack(images)
        outputs = model(images if scaled_inside else scale_pixels(images), training=False)
        outputs = keras.ops.convert_to_numpy(outputs).astype(np.float32)
        return outputs if softmax else _softmax(outputs)

    decode = make_decoder(size, trained_on.preprocessing)
    return Labeller(scores_of, decode, trained_on.class_names, size)


def _softmax(logits):
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _export_labeller(path):
    if not tensorflow_installed():
        raise ValueError(
            f"{path!r} is a SavedModel, a TensorFlow graph: install TensorFlow to run it, or give the "
            f".keras file or workdir it was exported from"
        )
    import tensorflow as tf

    from keras_mixer.model.pixels import EvalPreprocessing
    from keras_mixer.serving.export import export_metadata

    loaded = tf.saved_model.load(path)
    if "serving_default" not in loaded.signatures or "serving_images" not in loaded.signatures:
        raise ValueError(f"SavedModel {path!r} lacks keras_mixer's serving signatures (export it with keras_mixer)")
    about = export_metadata(path)
    size = tuple(loaded.signatures["serving_images"].structured_input_signature[1]["images"].shape[1:3])
    check = make_decoder(size, EvalPreprocessing.from_dict(about), about.get("max_pixels", DEFAULT_MAX_PIXELS))
    serve = loaded.signatures["serving_default"]

    def decode(data):
        check(data)  # refused here with its reason, so a batch sent to the signature never fails
        return data

    def scores_of(datas):
        return serve(image_bytes=tf.constant(datas))["probabilities"].numpy()

    scores_of.keep_alive = loaded  # the signature needs its SavedModel object alive
    names = about.get("class_names")
    return Labeller(scores_of, decode, tuple(names) if names else None, size)
