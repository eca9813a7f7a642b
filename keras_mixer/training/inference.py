"""Loading a trained model for evaluation or export, from whatever the user points at.

Accepted: a SavedModel folder (or a TF Serving base holding numbered versions), a `.keras` file,
a training workdir (its latest checkpoint) or one checkpoint path (`.../checkpoints/ckpt-N`), and,
for export, a preset name with a variant.
"""

import dataclasses
import json
import os
from typing import Callable, Optional

import keras
import tensorflow as tf

from keras_mixer.models import MlpMixer, create_model
from keras_mixer.presets import is_preset_name


@dataclasses.dataclass
class Predictor:
    predict: Callable  # images float32 [B, H, W, 3] in [0, 255] -> scores [B, classes]
    image_size: tuple
    class_names: Optional[list] = None
    dataset: Optional[str] = None
    eval_resize: str = "crop"  # the training run's evaluation preprocessing, when known
    crop_ratio: float = 0.875


def _saved_model_dir(path):
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = sorted((int(d) for d in os.listdir(path) if d.isdigit()), reverse=True) if os.path.isdir(path) else []
    for version in versions:
        candidate = os.path.join(path, str(version))
        if os.path.isfile(os.path.join(candidate, "saved_model.pb")):
            return candidate
    return None


def _run_record(source):
    """(workdir's run.json contents, checkpoint path) for a workdir or checkpoint path, else None."""
    if os.path.isfile(os.path.join(source, "run.json")):
        workdir, checkpoint = source, tf.train.latest_checkpoint(os.path.join(source, "checkpoints"))
    elif os.path.isfile(source + ".index"):
        workdir, checkpoint = os.path.dirname(os.path.dirname(os.path.abspath(source))), source
    else:
        return None
    with open(os.path.join(workdir, "run.json")) as f:
        record = json.load(f)
    if checkpoint is None:
        raise FileNotFoundError(f"workdir {workdir!r} has no checkpoint yet")
    return record, checkpoint


def load_keras_model(source, model_name=None, image_size=None):
    """(Keras model, class names or None) from a .keras file, a workdir/checkpoint or a preset."""
    if os.path.isfile(source) and source.endswith(".keras"):
        return keras.saving.load_model(source, safe_mode=True, compile=False), None
    found = _run_record(source) if os.path.exists(source) or os.path.exists(source + ".index") else None
    if found:
        record, checkpoint = found
        model = MlpMixer(**record["architecture"])
        tf.train.Checkpoint(model=model).restore(checkpoint).expect_partial().assert_existing_objects_matched()
        return model, record.get("class_names")
    if is_preset_name(source):
        if model_name is None:
            raise ValueError(f"preset {source!r} needs --model (the variant, e.g. B/16)")
        size = image_size or 224
        return create_model(model_name, weights=source, input_shape=(size, size, 3)), None
    raise FileNotFoundError(
        f"{source!r} is neither a .keras file, a training workdir, a checkpoint, a SavedModel nor a preset name"
    )


def load_predictor(source):
    """A `Predictor` for a SavedModel (its uint8 `serving_images` signature) or any Keras source."""
    saved = _saved_model_dir(source) if os.path.isdir(source) else None
    if saved:
        loaded = tf.saved_model.load(saved)
        if "serving_images" not in loaded.signatures:
            raise ValueError(f"SavedModel {saved!r} has no 'serving_images' signature (export it with keras_mixer)")
        signature = loaded.signatures["serving_images"]
        size = tuple(signature.structured_input_signature[1]["images"].shape[1:3])

        def predict(images):
            pixels = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
            return signature(images=pixels)["logits"]

        predict.keep_alive = loaded  # the signature needs its SavedModel object alive
        return Predictor(predict, size)
    model, class_names = load_keras_model(source)
    predictor = Predictor(lambda images: model(images, training=False), tuple(model.input_shape[1:3]), class_names)
    found = _run_record(source) if os.path.exists(source) and not source.endswith(".keras") else None
    if found:
        config = found[0]["config"]
        predictor.dataset, predictor.eval_resize, predictor.crop_ratio = (
            config["dataset"], config["eval_resize"], config["crop_ratio"]
        )
    return predictor
