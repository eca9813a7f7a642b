"""Every `.keras` the package or a user writes loads with `keras.saving.load_model` (and every preset
folder with `MlpMixer.from_preset`) in a fresh process that imports only keras_mixer and Keras, on
the TensorFlow, JAX and torch backends, with the outputs it was saved with. An in-process load
cannot show this: the process that built the model has its classes registered already."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import randomize, tiny_mixer
from runs import ENV, ROOT

import keras_mixer

V0_2 = os.path.join(ROOT, "tests", "data", "v0_2")

# Loads each file, predicts the saved images and prints {file: max |difference|} as JSON. The first
# argument says which is imported first: keras_mixer (Keras loads after it, through TensorFlow on
# that backend), its layers' module by version 0.2's path (which imports Keras itself), or Keras.
LOAD = """
import json, os, sys
import numpy as np
if sys.argv[1] == "keras_mixer_first":
    import keras_mixer
    import keras
elif sys.argv[1] == "layers_first":
    from keras_mixer.layers import MixerBlock
    import keras
    import keras_mixer
else:
    import keras
    import keras_mixer
result = {"backend": keras.backend.backend()}
for path, expected in json.loads(sys.argv[2]).items():
    # A .keras file as Keras loads it; a keras-hub preset folder as keras_mixer reads it.
    model = keras_mixer.MlpMixer.from_preset(path) if os.path.isdir(path) else keras.saving.load_model(path)
    saved = np.load(expected)
    out = keras.ops.convert_to_numpy(model(saved["images"], training=False))
    result[path] = [type(model).__name__, float(np.max(np.abs(out - saved["logits"])))]
print(json.dumps(result))
"""


def _saved(model, folder, name, images):
    path = os.path.join(folder, f"{name}.keras")
    model.save(path)
    np.savez(os.path.join(folder, f"{name}.npz"), images=images, logits=model.predict(images, verbose=0))
    return path, os.path.join(folder, f"{name}.npz")


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory):
    """{.keras path: .npz with its images and logits}: a user's model.save, an expanded-resolution
    model, an int8-quantized model, keras-hub preset folders (float and int8) and a file written by
    version 0.2."""
    folder = str(tmp_path_factory.mktemp("saved"))
    images = np.random.default_rng(3).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    files = dict([_saved(randomize(tiny_mixer(drop_path_rate=0.1, dropout_rate=0.1)), folder, "user", images)])
    wide = keras_mixer.expand_resolution(randomize(tiny_mixer(), seed=1), (32, 32))
    big = np.random.default_rng(4).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    files.update([_saved(wide, folder, "expanded", big)])
    quantized = randomize(tiny_mixer(), seed=2)
    quantized.quantize("int8")
    files.update([_saved(quantized, folder, "int8", images)])
    for name, model in (("preset", randomize(tiny_mixer(), seed=3)), ("int8_preset", quantized)):
        model.save_to_preset(os.path.join(folder, name))
        np.savez(os.path.join(folder, f"{name}.npz"), images=images, logits=model.predict(images, verbose=0))
        files[os.path.join(folder, name)] = os.path.join(folder, f"{name}.npz")
    files[os.path.join(V0_2, "tiny.keras")] = os.path.join(V0_2, "tiny_outputs.npz")
    return files


def _load_fresh(files, backend="tensorflow", first="keras_mixer_first"):
    """{path: [class name, max |difference| from the saved logits]} from a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", LOAD, first, json.dumps(files)],
        capture_output=True,
        text=True,
        env={**ENV, "KERAS_BACKEND": backend},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded.pop("backend") == backend
    assert set(loaded) == set(files)
    return loaded


@pytest.mark.parametrize(
    "backend,first",
    [
        ("tensorflow", "keras_mixer_first"),
        ("tensorflow", "keras_first"),
        ("jax", "keras_mixer_first"),
        ("jax", "layers_first"),
        ("torch", "keras_mixer_first"),
    ],
)
def test_every_saved_model_loads_in_a_fresh_process(saved_files, backend, first):
    for path, (cls, difference) in _load_fresh(saved_files, backend, first).items():
        assert cls == "MlpMixer", path
        assert difference < 1e-4, (path, difference)


@pytest.mark.slow
def test_a_training_runs_model_keras_loads_in_a_fresh_process(demo, tmp_path):
    import keras

    path = os.path.join(demo[0], "model.keras")
    model = keras.saving.load_model(path)
    images = np.random.default_rng(5).uniform(0, 255, (2, *model.input_shape[1:])).astype("float32")
    np.savez(tmp_path / "run.npz", images=images, logits=model.predict(images, verbose=0))
    for backend in ("tensorflow", "jax", "torch"):
        ((cls, difference),) = _load_fresh({path: str(tmp_path / "run.npz")}, backend).values()
        assert cls == "MlpMixer" and difference < 1e-4, backend


def test_tf_keras_loads_a_saved_model_after_import_keras_mixer(saved_files):
    # tf.keras is Keras 3 loaded lazily by TensorFlow: the registration must follow that import too.
    path = os.path.join(V0_2, "tiny.keras")
    code = f"import keras_mixer, tensorflow as tf\nprint(type(tf.keras.models.load_model({path!r})).__name__)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "MlpMixer"


def test_import_keras_mixer_alone_loads_no_keras():
    # The registration waits for Keras: the programs quiet TensorFlow's start-up before it loads.
    code = "import sys, keras_mixer\nprint(sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_a_version_0_2_export_still_serves_and_evaluates_as_it_did():
    # Its metadata predates the interpolation and pixel fields: the defaults (bilinear, [-1, 1]) hold.
    from runs import trainer

    export = os.path.join(V0_2, "export")
    with open(os.path.join(V0_2, "export_metrics.json")) as f:
        expected = json.load(f)["eval_top1"]
    out = trainer("evaluate", "--source", export).stdout
    assert float(out.split("top-1:")[1].split()[0]) == pytest.approx(expected, abs=5e-5)  # printed to 4 digits


@pytest.mark.slow
@pytest.mark.parametrize("backend, prefix", [("tensorflow", ""), ("jax", "jax_")])
def test_a_version_0_2_workdir_resumes_to_the_weights_it_would_have_reached(tmp_path, backend, prefix):
    # A run of version 0.2 (`pretrain.py --steps 4 --checkpoint_every 2 --log_every 2`), stopped after
    # its step-2 checkpoint: the same command on this code finishes it with the weights version 0.2's
    # uninterrupted run reached, to the bit. On TensorFlow a tf.train checkpoint, on JAX an orbax one.
    import shutil

    from runs import trainer

    workdir = tmp_path / "run"
    shutil.copytree(os.path.join(V0_2, f"{prefix}workdir_at_step_2"), workdir)
    args = ("--workdir", workdir, "--steps", 4, "--checkpoint_every", 2, "--log_every", 2)
    out = trainer("pretrain", *args, env={"KERAS_BACKEND": backend}).stdout
    assert "Resumed from step 2" in out and "Finished step 4" in out  # resumed, not started again
    check = (
        "import sys, keras, keras_mixer, numpy as np\n"
        "final = keras.saving.load_model(sys.argv[1]).get_weights()\n"
        "expected = np.load(sys.argv[2])\n"
        "assert len(final) == len(expected.files), (len(final), len(expected.files))\n"
        "for i, w in enumerate(final):\n"
        "    np.testing.assert_array_equal(w, expected[f'arr_{i}'])\n"
        "print('identical')\n"
    )
    expected = os.path.join(V0_2, f"{prefix}workdir_final_weights.npz")
    result = subprocess.run(
        [sys.executable, "-c", check, str(workdir / "model.keras"), expected],
        capture_output=True,
        text=True,
        env={**ENV, "KERAS_BACKEND": backend},
    )
    assert result.stdout.strip() == "identical", result.stderr[-2000:]
