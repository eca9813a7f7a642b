"""Models that travel: keras-hub preset folders, the Hugging Face Hub and Kaggle through their own
clients and caches (offline: the caches are built here), timm's Mixer repos with their own pixel
normalisation and evaluation preprocessing, and one-line refusals of bad sources."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from conftest import randomize, tiny_mixer
from runs import ENV, assert_one_line_error, trainer
from timm.models._hub import save_for_hf
from timm.models.mlp_mixer import MlpMixer as TimmMixer

import keras_mixer
from keras_mixer.model.trained_on import TrainedOn
from keras_mixer.weights_io import hubs
from keras_mixer.weights_io.official_keys import WeightsError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY_TIMM = dict(patch_size=16, num_blocks=2, embed_dim=64, img_size=64, num_classes=7)


def timm_repo(folder, tag="mixer_b16_224.miil_in21k_ft_in1k", seed=0, **changes):
    """A real timm repo folder (timm's own `save_for_hf`) of a tiny Mixer with random weights (a
    non-zero head: timm starts it at zero), described as `tag`'s architecture and pretrained_cfg
    with `model_args` saying its size. Returns the timm model."""
    args = {**TINY_TIMM, **changes}
    torch.manual_seed(seed)
    model = TimmMixer(**args).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    cfg = timm.models.get_pretrained_cfg(tag).to_dict()
    cfg.update(architecture=tag.split(".")[0], tag=tag.split(".")[1], num_classes=args["num_classes"])
    model.pretrained_cfg = cfg
    save_for_hf(model, str(folder), safe_serialization=True, model_args=args)
    return model


def hf_cache(cache, repo, files, revisions=("main",), commit=COMMIT):
    """Lays `files` (a folder) out as huggingface_hub's cache does: models--ORG--NAME/snapshots/
    <commit>/ and refs/<revision> holding the commit."""
    base = os.path.join(cache, f"models--{repo.replace('/', '--')}")
    shutil.copytree(files, os.path.join(base, "snapshots", commit))
    os.makedirs(os.path.join(base, "refs"), exist_ok=True)
    for revision in revisions:
        with open(os.path.join(base, "refs", revision), "w") as f:
            f.write(commit)


@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    """huggingface_hub offline on a cache folder of this test's own (its constants are read at its
    import, so they are set on the module, as HF_HUB_OFFLINE=1 and HF_HUB_CACHE would at start)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return str(cache)


def timm_logits(model, images):
    """timm's forward pass on uint8-range `images` [B, H, W, 3] normalised by the model's own data
    config, as timm's evaluation transforms do."""
    config = timm.data.resolve_model_data_config(model)
    mean, std = np.array(config["mean"], np.float32), np.array(config["std"], np.float32)
    x = (images / np.float32(255.0) - mean) / std
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(7).integers(0, 256, (3, 64, 64, 3)).astype(np.float32)


@pytest.mark.parametrize(
    "tag,mean,interpolation",
    [("mixer_b16_224.miil_in21k_ft_in1k", 0.0, "bilinear"), ("mixer_b16_224.goog_in21k_ft_in1k", 0.5, "bicubic")],
)
def test_a_timm_repo_loads_by_its_hub_name_with_its_own_pixels(tmp_path, offline_hf, pixels, tag, mean, interpolation):
    reference = timm_repo(tmp_path / "repo", tag)
    hf_cache(offline_hf, f"timm/{tag}", tmp_path / "repo")
    model = keras_mixer.MlpMixer.from_preset(f"hf://timm/{tag}", classifier_activation=None)
    expected = timm_logits(reference, pixels)
    assert np.ptp(expected, axis=0).max() > 0.05  # a real head: the logits differ between images
    np.testing.assert_allclose(model.predict(pixels, verbose=0), expected, atol=2e-5, rtol=1e-5)
    assert model.name == tag.replace(".", "_") and model.gelu == "exact"
    weights = keras_mixer.weights_io.loader.open_weights(f"hf://timm/{tag}")
    record = weights.trained_on
    assert record.pixel_mean == (mean,) * 3 and record.preprocessing.interpolation == interpolation
    assert record.preprocessing.crop_ratio == 0.875 and record.image_size == (64, 64)
    # Fine-tuning keeps the pixels: a model built on these weights (weights= takes the hub name, as
    # the variant constructors do) for another head normalises alike.
    tuned = keras_mixer.weights_io.loader.build(
        keras_mixer.MlpMixer, TinyArchitecture, f"hf://timm/{tag}", classes=3, input_shape=(64, 64, 3)
    )
    assert tuned.get_config()["pixel_mean"] == (mean,) * 3 and tuned.gelu == "exact"


TinyArchitecture = dict(patch_size=16, hidden_dim=64, num_blocks=2, tokens_mlp_dim=32, channels_mlp_dim=256)


def test_the_export_of_googles_weights_resizes_bicubically_as_timm_evaluates(tmp_path, offline_hf):
    import tensorflow as tf

    from keras_mixer.data import transforms
    from keras_mixer.model.pixels import EvalPreprocessing
    from keras_mixer.serving.export import export_metadata, export_saved_model
    from keras_mixer.serving.trained_models import load_keras_model

    tag = "mixer_b16_224.goog_in21k_ft_in1k"
    timm_repo(tmp_path / "repo", tag)
    hf_cache(offline_hf, f"timm/{tag}", tmp_path / "repo")
    model, trained_on = load_keras_model(f"hf://timm/{tag}")  # as export.py, evaluate.py and predict.py
    path = export_saved_model(model, str(tmp_path / "export"), trained_on=trained_on)
    assert export_metadata(path)["interpolation"] == "bicubic"
    picture = np.random.default_rng(3).integers(0, 256, (90, 120, 3)).astype(np.uint8)
    served = tf.saved_model.load(path).signatures["serving_default"]
    scores = served(image_bytes=tf.constant([tf.io.encode_png(picture).numpy()]))["probabilities"].numpy()
    bicubic = transforms.eval_image(picture, (64, 64), trained_on.preprocessing)[None]
    np.testing.assert_allclose(scores, model(bicubic, training=False).numpy(), atol=1e-5, rtol=1e-4)
    bilinear = transforms.eval_image(picture, (64, 64), EvalPreprocessing())[None]
    assert np.abs(scores - model(bilinear, training=False).numpy()).max() > 1e-4  # it matters here


def test_wrong_pixels_would_change_the_answer(tmp_path, offline_hf, pixels):
    # The check above could not pass by accident: the official [-1, 1] scaling gives other logits.
    timm_repo(tmp_path / "repo")
    hf_cache(offline_hf, "timm/mixer_b16_224.miil_in21k_ft_in1k", tmp_path / "repo")
    right = keras_mixer.MlpMixer.from_preset("hf://timm/mixer_b16_224.miil_in21k_ft_in1k")
    wrong = keras_mixer.MlpMixer.from_preset(
        "hf://timm/mixer_b16_224.miil_in21k_ft_in1k", pixel_mean=0.5, pixel_std=0.5
    )
    assert np.abs(right.predict(pixels, verbose=0) - wrong.predict(pixels, verbose=0)).max() > 1e-3


def test_an_offline_miss_names_the_repo_the_cache_and_the_variable(offline_hf):
    with pytest.raises(hubs.HubUnavailable) as refused:
        keras_mixer.MlpMixer.from_preset("hf://timm/mixer_b16_224.goog_in21k")
    message = str(refused.value)
    assert "hf://timm/mixer_b16_224.goog_in21k" in message and offline_hf in message and "HF_HUB_OFFLINE" in message


def test_a_revision_not_in_the_cache_is_named_with_those_that_are(tmp_path, offline_hf):
    model = randomize(tiny_mixer())
    model.save_to_preset(tmp_path / "preset")
    hf_cache(offline_hf, "me/tiny", tmp_path / "preset", revisions=("main", "v1"))
    assert keras_mixer.MlpMixer.from_preset("hf://me/tiny@v1").count_params() == model.count_params()
    with pytest.raises(hubs.HubUnavailable, match=r"revision v2 .*cached revisions: main, v1"):
        keras_mixer.MlpMixer.from_preset("hf://me/tiny@v2")


def test_a_timm_repo_of_another_architecture_is_refused(tmp_path, offline_hf):
    timm_repo(tmp_path / "repo")
    config = json.loads((tmp_path / "repo" / "config.json").read_text())
    config["architecture"] = "resnet50"
    (tmp_path / "repo" / "config.json").write_text(json.dumps(config))
    hf_cache(offline_hf, "timm/resnet50.a1_in1k", tmp_path / "repo")
    with pytest.raises(ValueError, match="holds timm's 'resnet50', not an MLP-Mixer"):
        keras_mixer.MlpMixer.from_preset("hf://timm/resnet50.a1_in1k")


def test_truncated_and_mismatched_timm_weights_are_refused(tmp_path):
    timm_repo(tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        keras_mixer.MlpMixer.from_preset(tmp_path / "cut")
    timm_repo(tmp_path / "other", num_blocks=3)
    timm_repo(tmp_path / "mixed")
    shutil.copy(tmp_path / "other" / "model.safetensors", tmp_path / "mixed" / "model.safetensors")
    with pytest.raises(WeightsError, match="3 blocks .* 2 blocks.*do not belong together"):
        keras_mixer.MlpMixer.from_preset(tmp_path / "mixed")


def test_a_preset_folder_is_keras_hubs_and_round_trips(tmp_path, images):
    model = randomize(tiny_mixer())
    record = TrainedOn(dataset="digits", class_names=[str(i) for i in range(7)], model="T/4", step=5)
    model.save_to_preset(tmp_path / "preset", trained_on=record, top1=0.5)
    assert sorted(os.listdir(tmp_path / "preset")) == ["config.json", "metadata.json", "model.weights.h5"]
    config = json.loads((tmp_path / "preset" / "config.json").read_text())
    assert config["registered_name"] == "keras_mixer>MlpMixer" and "build_config" not in config
    metadata = json.loads((tmp_path / "preset" / "metadata.json").read_text())
    assert {"keras_version", "keras_hub_version", "parameter_count", "date_saved", "tasks"} <= set(metadata)
    assert metadata["parameter_count"] == model.count_params() and metadata["trained_on"]["class_names"][6] == "6"
    loaded = keras_mixer.MlpMixer.from_preset(tmp_path / "preset")
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    assert keras_mixer.weights_io.loader.open_weights(tmp_path / "preset").trained_on == record
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        model.save_to_preset(tmp_path / "preset")


def test_a_full_disk_while_writing_a_preset_folder_leaves_nothing_behind(tmp_path, monkeypatch):
    import errno

    model = randomize(tiny_mixer())

    def full(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half")  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(model, "save_weights", full)
    with pytest.raises(OSError, match="No space left"):
        model.save_to_preset(tmp_path / "preset")
    assert os.listdir(tmp_path) == []  # neither the folder nor a temporary one
    monkeypatch.undo()
    model.save_to_preset(tmp_path / "preset")  # the same call succeeds once there is room
    assert keras_mixer.MlpMixer.from_preset(tmp_path / "preset").count_params() == model.count_params()


def test_keras_hubs_own_upload_accepts_the_folder(tmp_path, monkeypatch):
    from keras_hub.src.utils import preset_utils

    randomize(tiny_mixer()).save_to_preset(tmp_path / "preset")
    calls = []
    monkeypatch.setattr(preset_utils.kagglehub, "model_upload", lambda handle, folder: calls.append((handle, folder)))
    preset_utils.upload_preset("kaggle://me/mixer/keras/tiny", str(tmp_path / "preset"))
    assert calls == [("me/mixer/keras/tiny", str(tmp_path / "preset"))]


def test_upload_preset_calls_each_client_with_a_model_card(tmp_path, monkeypatch):
    import huggingface_hub
    import kagglehub

    record = TrainedOn(dataset="digits", model="T/4")
    randomize(tiny_mixer()).save_to_preset(tmp_path / "preset", trained_on=record, top1=0.9833)
    calls = []

    class Repo:
        repo_id = "me/tiny"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, exist_ok: calls.append(("create", repo)) or Repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw["folder_path"])))
    monkeypatch.setattr(kagglehub, "model_upload", lambda handle, folder, **kw: calls.append(("kaggle", handle)))
    keras_mixer.upload_preset("hf://me/tiny", tmp_path / "preset")
    keras_mixer.upload_preset("kaggle://me/mixer/keras/tiny", tmp_path / "preset")
    assert calls == [("create", "me/tiny"), ("upload", str(tmp_path / "preset")), ("kaggle", "me/mixer/keras/tiny")]
    card = (tmp_path / "preset" / "README.md").read_text()
    assert "T/4" in card and "digits" in card and "0.9833" in card
    with pytest.raises(ValueError, match="not a revision"):
        keras_mixer.upload_preset("hf://me/tiny@v1", tmp_path / "preset")


def test_a_broken_preset_folder_is_refused_in_one_sentence(tmp_path):
    randomize(tiny_mixer()).save_to_preset(tmp_path / "preset")
    shutil.copytree(tmp_path / "preset", tmp_path / "cut")
    weights = tmp_path / "cut" / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:3000])
    with pytest.raises(WeightsError, match="does not fit the model its config.json describes"):
        keras_mixer.MlpMixer.from_preset(tmp_path / "cut")
    os.remove(tmp_path / "preset" / "metadata.json")
    with pytest.raises(FileNotFoundError, match="lacks metadata.json"):
        keras_mixer.MlpMixer.from_preset(tmp_path / "preset")
    with pytest.raises(FileNotFoundError, match="lacks metadata.json"):
        keras_mixer.upload_preset("hf://me/tiny", tmp_path / "preset")  # not uploaded either


def test_a_quantized_preset_folder_loads_as_saved(tmp_path, images):
    model = randomize(tiny_mixer())
    model.quantize("int8")
    model.save_to_preset(tmp_path / "int8")
    loaded = keras_mixer.MlpMixer.from_preset(tmp_path / "int8")
    assert loaded.get_layer("head").quantization_mode == "int8"
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    with pytest.raises(ValueError, match="quantized model, which loads as saved"):
        keras_mixer.MlpMixer.from_preset(tmp_path / "int8", classes=3)


def test_a_kaggle_model_loads_from_kagglehubs_cache(tmp_path, monkeypatch, images):
    model = randomize(tiny_mixer())
    version = tmp_path / "kaggle" / "models" / "me" / "mixer" / "keras" / "tiny"
    model.save_to_preset(version / "1")
    (version / "1.complete").write_text("")  # kagglehub's mark of a whole download
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle"))
    loaded = keras_mixer.MlpMixer.from_preset("kaggle://me/mixer/keras/tiny/1")
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    assert loaded.name == "tiny"
    with pytest.raises(ValueError, match="kaggle://owner/model/keras/variant"):
        keras_mixer.MlpMixer.from_preset("kaggle://me/mixer")


def test_list_presets_names_timms_weights_with_their_top1_and_source():
    listed = keras_mixer.list_presets()
    miil = listed["hf://timm/mixer_b16_224.miil_in21k_ft_in1k"]
    assert miil["top1"] == pytest.approx(0.823) and "651" in miil["top1_source"]
    assert miil["pixel_mean"] == [0.0] * 3 and miil["eval_preprocessing"]["interpolation"] == "bilinear"
    assert listed["hf://timm/mixer_b16_224.miil_in21k"]["classes"] == 11221
    assert listed["hf://timm/mixer_l16_224.goog_in21k"]["eval_preprocessing"]["interpolation"] == "bicubic"
    # Every name is one timm publishes, with timm's own normalisation.
    for name, meta in listed.items():
        if name.startswith("hf://timm/"):
            cfg = timm.models.get_pretrained_cfg(name[len("hf://timm/") :])
            assert (tuple(meta["pixel_mean"]), meta["classes"]) == (tuple(cfg.mean), cfg.num_classes)
            assert meta["eval_preprocessing"]["interpolation"] == cfg.interpolation


def test_offline_in_a_fresh_process_through_the_real_variables(tmp_path, pixels):
    reference = timm_repo(tmp_path / "repo")
    cache = tmp_path / "cache"
    hf_cache(cache, "timm/mixer_b16_224.miil_in21k_ft_in1k", tmp_path / "repo")
    np.save(tmp_path / "pixels.npy", pixels)
    code = (
        "import numpy as np, keras_mixer\n"
        "m = keras_mixer.MlpMixer.from_preset(\n"
        "    'hf://timm/mixer_b16_224.miil_in21k_ft_in1k', classifier_activation=None)\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, m.predict(np.load({str(tmp_path / 'pixels.npy')!r}), verbose=0))\n"
    )
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), timm_logits(reference, pixels), atol=2e-5, rtol=1e-5)


def test_a_program_refuses_a_missing_hub_model_in_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")}
    result = trainer("evaluate", "--source", "hf://timm/mixer_b16_224.goog_in21k", check=False, env=env)
    assert_one_line_error(result, "hf://timm/mixer_b16_224.goog_in21k", str(tmp_path / "empty"), "HF_HUB_OFFLINE")
    assert not os.path.exists(tmp_path / "empty")  # nothing written


# --- the programs: export writes a preset folder, every --source and --init reads one ---------------


def _digit_png(folder):
    """A PNG of one real digit (scikit-learn's), 8 x 8 px."""
    from PIL import Image
    from sklearn.datasets import load_digits

    path = os.path.join(folder, "digit.png")
    pixels = (load_digits().images[0] * 16).clip(0, 255).astype(np.uint8)
    Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(path)
    return path


@pytest.mark.slow
def test_a_finished_workdir_exports_a_preset_folder_that_every_program_reads(demo, tmp_path):
    workdir = demo[0]
    preset = tmp_path / "digits_preset"
    out = trainer("export", "--source", workdir, "--preset_dir", preset).stdout
    assert f"{preset} (keras-hub preset folder)" in out and not (tmp_path / "export").exists()
    metadata = json.loads((preset / "metadata.json").read_text())
    run = json.loads((workdir / "metrics.json").read_text())
    assert metadata["top1"] == run["eval_top1"] and metadata["trained_on"]["dataset"] == "digits"
    assert len(metadata["trained_on"]["class_names"]) == 10
    evaluated = trainer("evaluate", "--source", preset).stdout  # the data set recorded in the folder
    assert float(evaluated.split("top-1:")[1].split()[0]) == pytest.approx(run["eval_top1"], abs=5e-5)  # 4 digits
    refused = trainer("export", "--source", workdir, "--preset_dir", preset, check=False)
    assert_one_line_error(refused, "exists and is not empty")
    predicted = trainer("predict", "--source", preset, "--format", "json", _digit_png(tmp_path)).stdout
    assert json.loads(predicted.strip().splitlines()[-1])["top"][0]["label"] in metadata["trained_on"]["class_names"]
    # Fine-tuning from the folder (the demo fine-tuning recipe: twice its size, expanded).
    trainer("finetune", "--init", preset, "--workdir", tmp_path / "tuned", "--steps", 2, "--noexport")
    tuned = json.loads((tmp_path / "tuned" / "run.json").read_text())
    assert tuned["architecture"]["input_shape"] == [16, 16, 3]


@pytest.mark.slow
def test_fine_tuning_from_a_timm_hub_name_keeps_its_pixels(tmp_path):
    timm_repo(tmp_path / "repo")
    cache = tmp_path / "cache"
    hf_cache(cache, "timm/mixer_b16_224.miil_in21k_ft_in1k", tmp_path / "repo")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    init, run = "hf://timm/mixer_b16_224.miil_in21k_ft_in1k", tmp_path / "run"
    trainer("finetune", "--init", init, "--image_size", 64, "--workdir", run, "--steps", 2, "--noexport", env=env)
    import keras

    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    assert model.get_config()["pixel_mean"] == (0.0,) * 3 and model.get_config()["pixel_std"] == (1.0,) * 3
    assert model.input_shape == (None, 64, 64, 3)
