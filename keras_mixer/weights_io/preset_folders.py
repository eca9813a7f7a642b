"""keras-hub preset folders, the form Keras users share models in, written and read with keras-hub's
file names and fields (so keras-hub's own `upload_preset` accepts the folder):

    config.json        the model serialized (`keras.saving.serialize_keras_object`: module,
                       class_name, config, registered_name "keras_mixer>MlpMixer"), without
                       build and compile configs, as keras-hub writes it
    model.weights.h5   its weights (`model.save_weights`)
    metadata.json      keras-hub's fields (keras_version, keras_hub_version: null, as no keras-hub
                       wrote it, parameter_count, date_saved, tasks) plus keras_mixer_version and
                       trained_on: the `TrainedOn` record (class names, evaluation preprocessing,
                       pixel normalisation, ...)

A folder is written whole or not at all: into a temporary folder beside it, renamed into place.
"""

import datetime
import json
import os
import shutil

import keras

from keras_mixer.atomic_files import TMP_PREFIX
from keras_mixer.model.trained_on import TrainedOn
from keras_mixer.weights_io.file_formats import WeightsError

CONFIG, WEIGHTS, METADATA = "config.json", "model.weights.h5", "metadata.json"
FILES = (CONFIG, WEIGHTS, METADATA)
MIXER = "keras_mixer>MlpMixer"


def save_to_preset(model, folder, trained_on=None, top1=None):
    """Writes `model` (an `MlpMixer`, quantized or not) as a preset folder at `folder`, which must not
    exist or be empty; `trained_on` (a `TrainedOn`) and `top1` (its evaluation top-1, a fraction)
    are recorded in metadata.json. Returns `folder`."""
    from keras_mixer.version import __version__

    folder = os.fspath(folder)
    if os.path.isdir(folder) and os.listdir(folder):
        raise FileExistsError(f"preset folder {folder!r} exists and is not empty: give a new folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"{folder!r} is a file, not a folder for a preset")
    config = keras.saving.serialize_keras_object(model)
    for key in ("build_config", "compile_config"):
        config.pop(key, None)
    metadata = dict(
        keras_version=keras.version(),
        keras_hub_version=None,
        parameter_count=int(model.count_params()),
        date_saved=datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
        tasks=[],
        keras_mixer_version=__version__,
        trained_on=(trained_on or TrainedOn()).to_dict(),
        top1=top1,
    )
    parent, name = os.path.split(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f"{TMP_PREFIX}{os.getpid()}-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=4)
        model.save_weights(os.path.join(tmp, WEIGHTS))
        with open(os.path.join(tmp, METADATA), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=4)
        if os.path.isdir(folder):
            os.rmdir(folder)  # empty, checked above
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_metadata(folder):
    """metadata.json of a preset folder as a dict (ValueError naming the file if it is not JSON)."""
    return _json(os.path.join(folder, METADATA))


def load_model(folder):
    """(the model, its `TrainedOn`) from a preset folder: the class its config.json names, built from
    that config, with model.weights.h5 loaded. One-line errors for a missing file, a class that is
    not a Mixer, and weights that do not fit."""
    folder = os.fspath(folder)
    missing = [name for name in FILES if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise FileNotFoundError(
            f"preset folder {folder!r} lacks {', '.join(missing)} (a keras-hub preset folder holds {', '.join(FILES)})"
        )
    config = _json(os.path.join(folder, CONFIG))
    if config.get("registered_name") != MIXER:
        raise ValueError(
            f"preset folder {folder!r} holds a {config.get('registered_name') or config.get('class_name')!r}, "
            f"not a keras_mixer MlpMixer ({MIXER!r})"
        )
    metadata = read_metadata(folder)
    model = keras.saving.deserialize_keras_object(config)
    weights = os.path.join(folder, WEIGHTS)
    try:
        model.load_weights(weights)
    except Exception as e:  # h5py and Keras raise several types for truncated or foreign files
        reason = " ".join(str(e).split())[:300]
        raise WeightsError(f"{weights!r} does not fit the model its config.json describes: {reason}") from None
    return model, TrainedOn.from_dict(metadata.get("trained_on"))


def _json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path!r} is not valid JSON ({e})") from None
