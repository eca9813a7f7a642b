"""Loading a trained model for evaluation or export, from whatever the user points at.

Accepted: a SavedModel folder (or a TF Serving base holding numbered versions), a `.keras` file,
a training workdir (its latest checkpoint) or one checkpoint path (`.../checkpoints/ckpt-N`), and,
for export, a preset or a weights file.

Each comes with what it records of its training (`about`: dataset, class_names, eval_resize,
crop_ratio), so evaluation and serving prepare images as the model was evaluated.
"""

import dataclasses
import os
from typing import Callable, Optional

import keras
import tensorflow as tf

from keras_mixer import loader, presets
from keras_mixer.export import export_metadata
from keras_mixer.files import read_json
from keras_mixer.models import MlpMixer
from keras_mixer.preprocessing import EvalPreprocessing
from keras_mixer.training.checkpointing import checkpoint_steps, newest_intact
from keras_mixer.weights import keras_metadata


@dataclasses.dataclass
class Predictor:
    predict: Callable  # images float32 [B, H, W, 3] in [0, 255] -> scores [B, classes]
    image_size: tuple
    class_names: Optional[list] = None
    dataset: Optional[str] = None
    preprocessing: EvalPreprocessing = EvalPreprocessing()  # as the source was evaluated, when it records it


def _saved_model_dir(path):
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = sorted((int(d) for d in os.listdir(path) if d.isdigit()), reverse=True) if os.path.isdir(path) else []
    for version in versions:
        candidate = os.path.join(path, str(version))
        if os.path.isfile(os.path.join(candidate, "saved_model.pb")):
            return candidate
    return None


def _about_run(record):
    if "about" in record:
        return record["about"]
    config = record.get("config", {})  # a run.json written by version 0.1
    return dict(
        dataset=config.get("dataset"),
        class_names=record.get("class_names"),
        **EvalPreprocessing.from_dict(config).to_dict(),
    )


def _run_record(source):
    """(workdir's run.json contents, [checkpoint prefixes to try, newest first]) for a workdir or a
    checkpoint path, else None."""
    if os.path.isfile(os.path.join(source, "run.json")):
        workdir = source
        folder = os.path.join(source, "checkpoints")
        prefixes = [os.path.join(folder, f"ckpt-{s}") for s in sorted(checkpoint_steps(folder), reverse=True)]
    elif os.path.isfile(source + ".index"):
        workdir, prefixes = os.path.dirname(os.path.dirname(os.path.abspath(source))), [source]
    else:
        return None
    record = read_json(os.path.join(workdir, "run.json"))
    if record is None or "architecture" not in record:
        raise ValueError(f"{os.path.join(workdir, 'run.json')!r} is missing or unreadable: cannot rebuild the model")
    if not prefixes:
        raise FileNotFoundError(f"workdir {workdir!r} has no checkpoint yet")
    return record, prefixes


def _restore_newest(model, prefixes):
    """Restores the newest of `prefixes` that reads back completely (the workdir is only read,
    never changed); ValueError naming each failure when none does."""
    intact, failures = newest_intact(prefixes)
    if intact is None:
        raise ValueError("no checkpoint restores: " + "; ".join(f"{os.path.basename(p)}: {r}" for p, r in failures))
    tf.train.Checkpoint(model=model).restore(intact).expect_partial().assert_existing_objects_matched()
    return intact


def load_keras_model(source, model_name=None, image_size=None):
    """(Keras model, what it was trained on) from a .keras file, a workdir/checkpoint, a preset or
    a weights file.

    The second item is a dict with any of dataset, class_names, eval_resize, crop_ratio that the
    source records (empty for a file that records none). `model_name` (a variant) is needed only
    for a release name such as "imagenet21k"; `image_size` builds a preset or weights file at
    another (larger, multiple) size."""
    if os.path.isfile(source) and source.endswith(".keras"):
        model = keras.saving.load_model(source, safe_mode=True, compile=False)
        return model, keras_metadata(source) or {}
    found = _run_record(source) if os.path.exists(source) or os.path.exists(source + ".index") else None
    if found:
        record, prefixes = found
        model = MlpMixer.from_config(record["architecture"])
        _restore_newest(model, prefixes)
        return model, _about_run(record)
    if presets.is_preset_name(source) or os.path.isfile(source):
        weights = loader.open_weights(source, model_name)
        size = {} if image_size is None else dict(input_shape=(image_size, image_size, 3))
        return MlpMixer.from_preset(weights, **size), weights.about
    raise FileNotFoundError(
        f"{source!r} is neither a .keras file, a training workdir, a checkpoint, a SavedModel, a weights file nor a "
        f"preset name ({', '.join(presets.PRESETS)})"
    )


def load_predictor(source):
    """A `Predictor` for a SavedModel (its uint8 `serving_images` signature) or any Keras source,
    with what the source records of its data set and evaluation preprocessing."""
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
        about = export_metadata(saved)
    else:
        model, about = load_keras_model(source)
        size = tuple(model.input_shape[1:3])

        def predict(images):
            return model(images, training=False)

    known = {k: about[k] for k in ("class_names", "dataset") if about.get(k) is not None}
    return Predictor(predict, size, preprocessing=EvalPreprocessing.from_dict(about), **known)
