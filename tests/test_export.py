"""Serving: TF Serving SavedModels checked the way a server uses them, and ONNX."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from conftest import randomize, tiny_mixer

import keras_mixer
from keras_mixer.data.transforms import resize_and_center_crop
from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.serving.export import export_onnx, export_saved_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]

# Runs in a fresh interpreter that never imports keras_mixer , as TF Serving would.
SERVER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    export, requests, out = sys.argv[1], sys.argv[2], sys.argv[3]
    loaded = tf.saved_model.load(export)
    payload = np.load(requests)
    byte_requests = json.loads(str(payload["bytes_json"]))
    results = {}
    encoded = tf.constant([bytes.fromhex(h) for h in byte_requests])
    for name, value in loaded.signatures["serving_default"](image_bytes=encoded).items():
        results["bytes/" + name] = value.numpy()
    for name, value in loaded.signatures["serving_images"](images=tf.constant(payload["images"])).items():
        results["images/" + name] = value.numpy()
    try:  # a request that is not an image fails alone...
        loaded.signatures["serving_default"](image_bytes=tf.constant([b"definitely not an image"]))
        results["bad"] = np.array("accepted")
    except tf.errors.InvalidArgumentError as e:
        results["bad"] = np.array(str(e))
    # ... and the same loaded model serves the next valid request.
    results["after_bad"] = loaded.signatures["serving_default"](image_bytes=encoded[:1])["probabilities"].numpy()
    results["imported"] = np.array(sorted(m for m in sys.modules if m.startswith("keras_mixer")))
    np.savez(out, **{k: v.astype(str) if v.dtype.kind in "OSU" else v for k, v in results.items()})
    """
)


def _encoded_images():
    """A JPEG 40x30 RGB, a PNG 20x24 grey and a PNG 33x17 RGBA: any size and channel count."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
    grey = rng.integers(0, 255, (20, 24, 1), dtype=np.uint8)
    rgba = rng.integers(0, 255, (33, 17, 4), dtype=np.uint8)
    return [tf.io.encode_jpeg(rgb).numpy(), tf.io.encode_png(grey).numpy(), tf.io.encode_png(rgba).numpy()]


def _reference(model, encoded):
    """What the Keras model says for encoded images, preprocessed as the export promises."""
    size = model.input_shape[1:3]
    images = [
        resize_and_center_crop(tf.cast(tf.io.decode_image(b, channels=3, expand_animations=False), tf.float32), size)
        for b in encoded
    ]
    return np.asarray(model(tf.stack(images)))


def _serve(tmp_path, export, images):
    requests = tmp_path / "requests.npz"
    np.savez(requests, images=images, bytes_json=np.array(json.dumps([b.hex() for b in _encoded_images()])))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", SERVER, export, str(requests), str(tmp_path / "responses.npz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(tmp_path / "responses.npz"))


@pytest.mark.parametrize("activation, size", [(None, (16, 16)), ("softmax", (16, 16)), (None, (32, 48))])
def test_saved_model_in_a_fresh_process_matches_keras(tmp_path, activation, size):
    model = randomize(tiny_mixer(classifier_activation=activation))
    if size != (16, 16):
        model = keras_mixer.expand_resolution(model, size)  # expanded models export the same way
    export = export_saved_model(model, tmp_path / "base", class_names=CLASSES)
    assert export == str(tmp_path / "base" / "1")
    images = np.random.default_rng(1).integers(0, 255, (4, *size, 3), dtype=np.uint8)
    served = _serve(tmp_path, export, images)
    assert list(served["imported"]) == []  # the server never imported keras_mixer

    scores = np.asarray(model(images.astype("float32")))
    probabilities = scores if activation == "softmax" else tf.nn.softmax(scores).numpy()
    np.testing.assert_allclose(served["images/probabilities"], probabilities, atol=1e-5)
    expected_bytes = _reference(model, _encoded_images())
    expected_bytes = expected_bytes if activation == "softmax" else tf.nn.softmax(expected_bytes).numpy()
    np.testing.assert_allclose(served["bytes/probabilities"], expected_bytes, atol=1e-5)
    for kind, expected in (("images", probabilities), ("bytes", expected_bytes)):
        top = np.argsort(-expected, axis=1)[:, :5]
        np.testing.assert_array_equal(served[f"{kind}/top_k_ids"], top)
        np.testing.assert_allclose(served[f"{kind}/top_k_scores"], np.take_along_axis(expected, top, 1), atol=1e-5)
        np.testing.assert_array_equal(served[f"{kind}/top_k_labels"], np.array(CLASSES)[top])
        np.testing.assert_allclose(served[f"{kind}/probabilities"].sum(1), 1, atol=1e-5)
        np.testing.assert_allclose(
            tf.nn.softmax(served[f"{kind}/logits"]).numpy(), served[f"{kind}/probabilities"], atol=1e-5
        )
    assert "InvalidArgumentError" in str(served["bad"]) or "image" in str(served["bad"]).lower()
    assert "the request is not a JPEG or PNG image" in str(served["bad"])
    np.testing.assert_allclose(served["after_bad"], expected_bytes[:1], atol=1e-5)


def test_saved_model_cli_lists_both_signatures(tmp_path):
    export = export_saved_model(randomize(tiny_mixer()), tmp_path / "base", class_names=CLASSES)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run([cli, "show", "--dir", export, "--all"], capture_output=True, text=True, timeout=300).stdout
    for signature, argument, dtype in (
        ("serving_default", "image_bytes", "DT_STRING"),
        ("serving_images", "images", "DT_UINT8"),
    ):
        block = shown.split(f"signature_def['{signature}']")[1].split("signature_def[")[0]
        assert f"inputs['{argument}']" in block and dtype in block
        for output in ("logits", "probabilities", "top_k_ids", "top_k_scores", "top_k_labels"):
            assert f"outputs['{output}']" in block
    assert "shape: (-1, 16, 16, 3)" in shown and "shape: (-1)" in shown  # dynamic batch


def test_onnx_matches_keras(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    model = randomize(tiny_mixer())
    path = export_onnx(model, tmp_path / "mixer.onnx")
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(2).uniform(0, 255, (3, 16, 16, 3)).astype("float32")
    assert [i.name for i in session.get_inputs()] == ["images"]  # the name the README uses
    (output,) = session.run(None, {"images": images})
    np.testing.assert_allclose(output, np.asarray(model(images)), atol=1e-4)


def test_versions_and_bad_targets(tmp_path):
    model = randomize(tiny_mixer())
    base = tmp_path / "base"
    assert export_saved_model(model, base).endswith("1")
    assert export_saved_model(model, base).endswith("2")
    before = sorted(os.listdir(base / "1")), (base / "1" / "saved_model.pb").read_bytes()
    with pytest.raises(ValueError, match=r"version 1 already exists .* nothing was overwritten"):
        export_saved_model(model, base, version=1)
    assert (sorted(os.listdir(base / "1")), (base / "1" / "saved_model.pb").read_bytes()) == before
    assert sorted(os.listdir(base)) == ["1", "2"]  # no staging folder left behind
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(ValueError, match=r"'.*a_file' is a file, not a folder"):
        export_saved_model(model, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "keep me"
    with pytest.raises(ValueError, match=r"version must be a positive integer, got 0"):
        export_saved_model(model, base, version=0)
    with pytest.raises(ValueError, match=r"3 class names given for a model with 7 classes"):
        export_saved_model(model, base, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"Only classifiers can be served"):
        export_saved_model(tiny_mixer(include_top=False, pooling="avg"), base)
    with pytest.raises(ValueError, match=r"is a folder; give a file name"):
        export_onnx(model, tmp_path)


@pytest.mark.slow
def test_export_command_line(tmp_path):
    model = randomize(tiny_mixer())
    model.save(tmp_path / "m.keras")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [
        sys.executable,
        os.path.join(ROOT, "trainers", "export.py"),
        "--source",
        str(tmp_path / "m.keras"),
        "--export_base",
        str(tmp_path / "serving"),
        "--version",
        "7",
        "--class_names",
        str(tmp_path / "classes.txt"),
        "--onnx",
        str(tmp_path / "m.onnx"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = tf.saved_model.load(str(tmp_path / "serving" / "7"))
    images = np.random.default_rng(3).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    out = loaded.signatures["serving_images"](images=tf.constant(images))
    np.testing.assert_allclose(out["logits"].numpy(), np.asarray(model(images.astype("float32"))), atol=1e-5)
    assert out["top_k_labels"].numpy()[0, 0].decode() in CLASSES
    assert os.path.getsize(tmp_path / "m.onnx") > 0
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode != 0 and "version 7 already exists" in again.stderr


def test_a_preset_carries_its_class_names_and_evaluation_preprocessing(tmp_path, monkeypatch):
    """What an exported or evaluated preset is served with comes from the preset's own record."""
    from keras_mixer.serving.trained_models import load_keras_model

    mirror = tmp_path / "mirror" / "gsam"
    mirror.mkdir(parents=True)
    keras_mixer.save_npz(keras_mixer.MixerS32(), mirror / "Mixer-S_32.npz")
    monkeypatch.setenv("KERAS_MIXER_WEIGHTS_URL", (tmp_path / "mirror").as_uri())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    model, trained_on = load_keras_model("mixer_s32_gsam")
    assert isinstance(model, keras_mixer.MlpMixer) and model.input_shape == (None, 224, 224, 3)
    assert len(trained_on.class_names) == 1000 and trained_on.class_names[281] == "tabby"
    assert trained_on.preprocessing == EvalPreprocessing("crop", 0.875) and trained_on.dataset == "imagenet2012"
    # A release name needs the variant; a larger size expands.
    bigger, _ = load_keras_model("gsam", model_name="S/32", image_size=448)
    assert bigger.grid_size == (14, 14) and bigger.tokens_mlp_dim == 4 * model.tokens_mlp_dim


def test_a_class_names_file_is_read_in_label_order_and_each_bad_one_names_the_flag(tmp_path):
    from keras_mixer.programs.command_lines import read_class_names

    (tmp_path / "classes.txt").write_text("  cat \n\ndog\nbird\n")
    assert read_class_names(str(tmp_path / "classes.txt")) == ["cat", "dog", "bird"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n \n")
    for name, reason in [("missing.txt", "no such file"), ("latin1.txt", "cannot be read"), ("blank.txt", "no names")]:
        with pytest.raises(ValueError) as raised:
            read_class_names(str(tmp_path / name))
        message = str(raised.value)
        assert message.startswith(f"--class_names '{tmp_path / name}'") and reason in message
        assert "one class name per line" in message
