"""Loading a trained model for evaluation or export, from whatever the user points at.

Every kind `keras_mixer.weights_io.source_kinds.resolve` knows: a SavedModel folder (or a TF Serving base
holding numbered versions), a `.keras` file, a training workdir (its newest intact checkpoint) or
one checkpoint path (`.../checkpoints/ckpt-N`), a preset or a weights file (`.npz`, timm).

Each comes with what it records of its training (`TrainedOn`: data set, class names, evaluation
preprocessing), so evaluation and serving prepare images as the model was evaluated.
"""

import dataclasses
import os
from typing import Callable

from keras_mixer.atomic_files import read_json
from keras_mixer.model.mixer import MlpMixer
from keras_mixer.model.trained_on import TrainedOn
from keras_mixer.training.checkpoint_store import checkpoint_backend
from keras_mixer.training.tf.checkpoints import checkpoint_steps, newest_intact
from keras_mixer.weights_io import loader, source_kinds


@dataclasses.dataclass
class Predictor:
    predict: Callable  # images float32 [B, H, W, 3] in [0, 255] -> scores [B, classes]
    image_size: tuple
    trained_on: TrainedOn  # what the source records (the defaults where it records nothing)


def _checkpoint_prefixes(found):
    """The checkpoint prefixes to try, newest first: a checkpoint `Source`'s own, or every one in
    a workdir `Source`'s checkpoints folder."""
    if found.kind == "checkpoint":
        return [found.path]
    folder = found.in_workdir(source_kinds.CHECKPOINTS)
    return [os.path.join(folder, f"ckpt-{s}") for s in sorted(checkpoint_steps(folder), reverse=True)]


def _run_record(found):
    """(workdir's run.json contents, [checkpoint prefixes to try, newest first]) for a workdir or a
    checkpoint `Source`."""
    path = found.in_workdir(source_kinds.RUN_RECORD)
    record = read_json(path)
    if record is None or "architecture" not in record:
        raise ValueError(f"{path!r} is missing or unreadable: cannot rebuild the model")
    prefixes = _checkpoint_prefixes(found)
    if not prefixes:
        raise FileNotFoundError(f"workdir {found.workdir!r} has no checkpoint yet")
    return record, prefixes


def _restore_newest(model, prefixes):
    """Restores the newest of `prefixes` that reads back completely (the workdir is only read,
    never changed); ValueError naming each failure when none does."""
    intact, failures = newest_intact(prefixes)
    if intact is None:
        raise ValueError("no checkpoint restores: " + "; ".join(f"{os.path.basename(p)}: {r}" for p, r in failures))
    import tensorflow as tf  # a TF trainer's checkpoint; the other sources load without TensorFlow

    tf.train.Checkpoint(model=model).restore(intact).expect_partial().assert_existing_objects_matched()
    return intact


def _finished_model(found):
    """The .keras `Source` of a JAX-backend workdir `Source` (its checkpoints are orbax training
    states, which only the JAX trainer reads): its model.keras, once the run finished."""
    finished = source_kinds.finished_run(found)
    if finished is None:
        raise ValueError(
            f"workdir {found.path!r} holds checkpoints of the JAX trainer (orbax) and no model.keras yet: evaluate "
            f"or export it once the run finished, or resume it on KERAS_BACKEND=jax to finish it"
        )
    return finished


def load_keras_model(source, model_name=None, image_size=None):
    """(MlpMixer, `TrainedOn`) from a .keras file, a workdir/checkpoint, a preset or a weights file
    (or what `source_kinds.resolve` found of one).

    `model_name` (a variant) is needed only for a release name such as "imagenet21k"; `image_size`
    builds a preset or weights file at another (larger, multiple) size."""
    found = source_kinds.resolve(source, model_name)
    if found.kind == "workdir" and checkpoint_backend(found.in_workdir(source_kinds.CHECKPOINTS)) == "jax":
        found = _finished_model(found)
    if found.kind in ("workdir", "checkpoint"):
        record, prefixes = _run_record(found)
        model = MlpMixer.from_config(record["architecture"])
        _restore_newest(model, prefixes)
        return model, TrainedOn.from_dict(record)
    if found.kind == "export":
        raise ValueError(
            f"{source!r} is a SavedModel: it is served and evaluated as it is (evaluate.py), not rebuilt as a Keras "
            "model; give the .keras file or workdir it was exported from"
        )
    # A hub model keeps the name its fetched folder gives it, not its hub name (which open_weights("hf://...")
    # and from_preset give): the name evaluate, export and the studies have always given it.
    weights = loader.open_weights(dataclasses.replace(found, name=None), model_name)
    size = {} if image_size is None else dict(input_shape=(image_size, image_size, 3))
    return MlpMixer.from_preset(weights, **size), weights.trained_on


def load_predictor(source):
    """A `Predictor` for a SavedModel (its uint8 `serving_images` signature) or any Keras source,
    with what the source records of its data set and evaluation preprocessing."""
    found = source_kinds.resolve(source)
    if found.kind == "export":
        import tensorflow as tf

        from keras_mixer.serving.export import export_metadata

        loaded = tf.saved_model.load(found.path)
        if "serving_images" not in loaded.signatures:
            raise ValueError(
                f"SavedModel {found.path!r} has no 'serving_images' signature (export it with keras_mixer)"
            )
        signature = loaded.signatures["serving_images"]
        size = tuple(signature.structured_input_signature[1]["images"].shape[1:3])

        def predict(images):
            pixels = tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)
            return signature(images=pixels)["logits"]

        predict.keep_alive = loaded  # the signature needs its SavedModel object alive
        return Predictor(predict, size, TrainedOn.from_dict(export_metadata(found.path)))
    model, trained_on = load_keras_model(found)

    def predict(images):
        return model(images, training=False)

    return Predictor(predict, tuple(model.input_shape[1:3]), trained_on)
