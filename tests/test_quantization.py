"""Quantization the Keras way: `model.quantize(...)` straight after construction, a
`DTypePolicyMap` (or any policy) as `dtype=`, and quantized models that save and load back (the
fresh-process loads are in test_saved_models.py)."""

import keras
import numpy as np
import pytest
from conftest import randomize, tiny_mixer

import keras_mixer
from keras_mixer.weights_io.official_keys import WeightsError

DENSE = [
    f"MixerBlock_{i}/{mlp}/Dense_{j}" for i in range(2) for mlp in ("token_mixing", "channel_mixing") for j in (0, 1)
]


def _quantized(model):
    return sorted(layer.path for layer in model._flatten_layers() if layer.quantization_mode)


@pytest.mark.parametrize("mode", ["int8", "float8"])
def test_a_variant_quantizes_straight_after_construction(mode):
    model = keras_mixer.MixerS32(classes=5, input_shape=(64, 64, 3))
    model.quantize(mode)
    assert _quantized(model) == sorted(
        [f"MixerBlock_{i}/{m}/Dense_{j}" for i in range(8) for m in ("token_mixing", "channel_mixing") for j in (0, 1)]
        + ["head"]
    )
    assert {model.get_layer("head").quantization_mode} == {mode}
    assert model(np.zeros((1, 64, 64, 3), "float32")).shape == (1, 5)


@pytest.mark.parametrize("mode,tolerance", [("int8", 0.02), ("float8", 0.08)])
def test_quantized_outputs_stay_near_float32_and_save_exactly(tmp_path, images, mode, tolerance):
    model = randomize(tiny_mixer())
    reference = model.predict(images, verbose=0)
    model.quantize(mode)
    quantized = model.predict(images, verbose=0)
    # Close (a relative error of the logits' scale), but not equal: the Dense layers really changed.
    scale = np.abs(reference).max()
    assert 0 < np.abs(quantized - reference).max() < tolerance * scale
    model.save(tmp_path / "q.keras")
    loaded = keras.saving.load_model(tmp_path / "q.keras")
    assert _quantized(loaded) == sorted(DENSE + ["head"])
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), quantized)


def test_a_dtype_policy_map_quantizes_exactly_the_layers_it_names(tmp_path, images):
    quantized = keras.dtype_policies.get("int8_from_float32")
    policies = keras.dtype_policies.DTypePolicyMap("float32", {"MixerBlock_1/channel_mixing/Dense_0": quantized})
    policies["head"] = "int8_from_float32"  # a name, as keras-hub configs write it
    model = keras_mixer.MixerS32(weights=None, classes=3, input_shape=(64, 64, 3), dtype=policies)
    assert _quantized(model) == ["MixerBlock_1/channel_mixing/Dense_0", "head"]
    assert len(policies) == 2  # the caller's map is not changed by the model
    model.save(tmp_path / "m.keras")
    assert _quantized(keras.saving.load_model(tmp_path / "m.keras")) == ["MixerBlock_1/channel_mixing/Dense_0", "head"]


def test_a_policy_name_as_dtype_sets_every_layer(images):
    model = tiny_mixer(dtype="mixed_bfloat16")
    assert model.get_layer("MixerBlock_0").token_mixing.dense_0.compute_dtype == "bfloat16"
    assert model.get_layer("head").compute_dtype == "float32"  # logits in float32 under a mixed policy
    rebuilt = keras_mixer.MlpMixer.from_config(model.get_config())
    assert rebuilt.get_layer("MixerBlock_1").channel_mixing.dense_1.compute_dtype == "bfloat16"
    assert keras.ops.convert_to_numpy(model(images)).dtype == np.float32


def test_an_unquantized_model_writes_the_config_version_0_2_wrote():
    assert "dtype" not in tiny_mixer().get_config()


def test_a_quantized_model_is_refused_as_a_weights_file(tmp_path):
    model = tiny_mixer()
    model.quantize("int8")
    with pytest.raises(WeightsError, match="quantized.*int8.*save it as a .keras file or a preset folder"):
        keras_mixer.save_npz(model, tmp_path / "q.npz")
