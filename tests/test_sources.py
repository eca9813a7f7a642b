"""The one resolver of a --source string, and the one record of what a model was trained on."""

import json
import os

import pytest
from conftest import tiny_mixer

import keras_mixer
from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.model.trained_on import TrainedOn
from keras_mixer.weights_io import loader, source_kinds


def _touch(path, text=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_every_kind_of_source_is_told_apart(tmp_path):
    workdir = tmp_path / "run"
    _touch(str(workdir / "run.json"), "{}")
    checkpoint = _touch(str(workdir / "checkpoints" / "ckpt-5.index"))[: -len(".index")]
    base = tmp_path / "serving"
    for version in ("1", "2", "10"):
        _touch(str(base / version / "saved_model.pb"))
    os.makedirs(base / "11")  # a version being written: no saved_model.pb yet
    cases = {
        str(workdir): ("workdir", str(workdir)),
        checkpoint: ("checkpoint", checkpoint),
        str(base): ("export", str(base / "10")),  # the newest complete version
        str(base / "2"): ("export", str(base / "2")),
        _touch(str(tmp_path / "model.keras")): ("keras", str(tmp_path / "model.keras")),
        _touch(str(tmp_path / "Mixer-B_16.npz")): ("weights", str(tmp_path / "Mixer-B_16.npz")),
        "mixer_b16_imagenet1k": ("preset", "mixer_b16_imagenet1k"),
    }
    for source, (kind, path) in cases.items():
        assert source_kinds.resolve(source) == source_kinds.Source(kind, path), source
    # A release name needs its variant; the variant picks the preset.
    assert source_kinds.resolve("imagenet21k", "L/16").path == "mixer_l16_imagenet21k"


def test_a_source_that_is_nothing_says_what_it_could_be(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist: give a .keras file, a weights file"):
        source_kinds.resolve(str(tmp_path / "missing.keras"))
    # A bare name may be a folder that is not there or a preset misspelt: the line says both.
    with pytest.raises(ValueError, match=r"'mixer_z9' is neither a file or folder \(none by that name in .*\) nor a "):
        source_kinds.resolve("mixer_z9")
    with pytest.raises(ValueError, match="presets: mixer_b16_imagenet1k"):
        source_kinds.resolve("runs_demo")
    with pytest.raises(ValueError, match="neither a training workdir .* nor a SavedModel"):
        source_kinds.resolve(str(tmp_path))  # a folder of something else


def test_a_finished_workdir_gives_its_model_keras_as_weights(tmp_path):
    """`--init WORKDIR` fine-tunes from the run's final model; an unfinished run is refused in one line."""
    workdir = tmp_path / "run"
    _touch(str(workdir / "run.json"), "{}")
    with pytest.raises(ValueError, match="is a workdir whose run has not finished"):
        loader.open_weights(str(workdir))
    model = tiny_mixer()
    record = TrainedOn("digits", [str(i) for i in range(10)], EvalPreprocessing("resize"), "T/2", step=40)
    keras_mixer.weights_io.official_keys.save_keras(model, str(workdir / "model.keras"), record.to_dict())
    weights = loader.open_weights(str(workdir))
    assert weights.path == str(workdir / "model.keras") and weights.trained_on == record
    with pytest.raises(ValueError, match="is a checkpoint: weights are read from"):
        loader.open_weights(_touch(str(workdir / "checkpoints" / "ckpt-40.index"))[: -len(".index")])


def test_the_record_reads_back_every_form_it_was_written_in():
    record = TrainedOn("folder:/data/pets", ["cat", "dog"], EvalPreprocessing("crop", 0.9), "B/16", 224, step=500)
    assert record.image_size == (224, 224) and record.class_names == ("cat", "dog")
    written = json.loads(json.dumps(record.to_dict()))  # as a file holds it
    assert written["image_size"] == [224, 224] and written["eval_resize"] == "crop"
    assert TrainedOn.from_dict(written) == record
    assert TrainedOn.from_dict({"about": written, "config": {"dataset": "other"}}) == record  # a run.json
    export = dict(written, max_pixels=1000, precision="bfloat16", frozen=True)
    assert TrainedOn.from_dict(export) == record  # the serving settings beside it are not part of it
    # A version 0.1 run.json: the recipe held the data set, size and preprocessing, the class names at the top.
    old = {
        "config": {"dataset": "digits", "image_size": 8, "eval_resize": "resize", "crop_ratio": 0.875},
        "class_names": ["0", "1"],
    }
    assert TrainedOn.from_dict(old) == TrainedOn("digits", ("0", "1"), EvalPreprocessing("resize"), image_size=(8, 8))
    # Weights that record nothing: unknown data set, the paper's centre crop.
    assert TrainedOn.from_dict(None) == TrainedOn() and TrainedOn().preprocessing == EvalPreprocessing("crop", 0.875)
    with pytest.raises(ValueError, match="crop_ratio must be in"):
        TrainedOn.from_dict({"crop_ratio": 1.5})
