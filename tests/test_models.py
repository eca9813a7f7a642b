"""The model family: parameter counts, shapes, conventions, serialisation, compilation modes."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import TINY, randomize, tiny_mixer

import keras_mixer

# Table 1 of the paper: 224x224 input, 1000-class head.
PAPER_PARAMS = {
    "MixerS32": 19_104_624,
    "MixerS16": 18_528_264,
    "MixerS8": 20_646_504,
    "MixerB32": 60_293_428,
    "MixerB16": 59_880_472,
    "MixerL32": 206_939_264,
    "MixerL16": 208_196_168,
    "MixerH14": 432_350_952,
}


# The two largest (200M and 430M parameters) take 10-15 s each to build: in the slow lane.
@pytest.mark.parametrize(
    "constructor",
    [pytest.param(c, marks=pytest.mark.slow) if c in ("MixerL16", "MixerH14") else c for c in sorted(PAPER_PARAMS)],
)
def test_variant_parameter_counts_match_the_paper(constructor):
    model = getattr(keras_mixer, constructor)()
    assert model.count_params() == PAPER_PARAMS[constructor]
    assert model.input_shape == (None, 224, 224, 3)
    keras.backend.clear_session()


def test_b16_forward_and_official_initialisation():
    model = keras_mixer.MixerB16()
    images = np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype("float32")
    probs = np.asarray(model(images))
    # Zero head (official init): every class equally likely.
    np.testing.assert_allclose(probs, np.full((2, 1000), 1e-3), rtol=1e-5)
    kernel = model.get_layer("MixerBlock_3").channel_mixing.dense_0.kernel.numpy()
    # lecun_normal: std = sqrt(1 / fan_in), fan_in = C = 768.
    assert abs(kernel.std() - 768**-0.5) < 0.02 * 768**-0.5
    assert not model.get_layer("MixerBlock_3").channel_mixing.dense_0.bias.numpy().any()
    # The official LayerNorm epsilon (Keras' default is 1e-3).
    assert model.get_layer("pre_head_layer_norm").epsilon == 1e-6
    assert (
        model.get_layer("MixerBlock_3").layer_norm_0.epsilon
        == model.get_layer("MixerBlock_3").layer_norm_1.epsilon
        == 1e-6
    )
    features = np.asarray(keras_mixer.MixerB16(include_top=False, pooling="avg")(images))
    assert features.shape == (2, 768) and np.isfinite(features).all()


def test_variant_names_and_create_model():
    assert keras_mixer.MixerL16(include_top=False, input_shape=(32, 32, 3)).name == "mixer_l16"
    model = keras_mixer.create_model("S/32", input_shape=(64, 96, 3), include_top=False)
    assert model.output_shape == (None, 6, 512)
    with pytest.raises(ValueError, match=r"'X/9'.*B/16"):
        keras_mixer.create_model("X/9")


@pytest.mark.parametrize("input_shape", [(16, 16, 3), (8, 20, 3)])
def test_output_shapes_and_pooling(input_shape):
    tokens = input_shape[0] // 4 * input_shape[1] // 4
    images = np.random.default_rng(0).uniform(0, 255, (2, *input_shape)).astype("float32")
    seq = tiny_mixer(include_top=False, input_shape=input_shape)
    randomize(seq)
    out = np.asarray(seq(images))
    assert out.shape == (2, tokens, 24)
    for pooling, reduce in (("avg", np.mean), ("max", np.max)):
        pooled = tiny_mixer(include_top=False, pooling=pooling, input_shape=input_shape)
        pooled.set_weights(seq.get_weights())
        np.testing.assert_allclose(np.asarray(pooled(images)), reduce(out, axis=1), atol=1e-5)
    top = tiny_mixer(input_shape=input_shape, classifier_activation="softmax")
    probs = np.asarray(randomize(top)(images))
    assert probs.shape == (2, 7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_input_tensor_and_preprocessing(images):
    inputs = keras.Input((16, 16, 3))
    model = randomize(tiny_mixer(input_tensor=inputs))
    assert model.input is inputs
    raw = tiny_mixer(include_preprocessing=False)
    raw.set_weights(model.get_weights())
    np.testing.assert_allclose(
        np.asarray(raw(keras_mixer.preprocess_input(images))), np.asarray(model(images)), atol=1e-5
    )
    np.testing.assert_allclose(keras_mixer.preprocess_input(np.array([0.0, 127.5, 255.0])), [-1, 0, 1])


def test_token_feature_model_reads_every_block(images):
    model = randomize(tiny_mixer(num_blocks=3))
    features = keras_mixer.token_feature_model(model)(images)
    assert list(features) == ["stem", "MixerBlock_0", "MixerBlock_1", "MixerBlock_2"]
    assert all(tuple(f.shape) == (3, 16, 24) for f in features.values())
    # Block 2's output through the pre-head LayerNorm and the mean is what the head sees.
    pre_logits = model.get_layer("avg_pool")(model.get_layer("pre_head_layer_norm")(features["MixerBlock_2"]))
    np.testing.assert_allclose(np.asarray(model.get_layer("head")(pre_logits)), np.asarray(model(images)), atol=1e-5)


def test_keras_file_round_trip_is_exact(tmp_path, images):
    model = randomize(tiny_mixer(drop_path_rate=0.1, dropout_rate=0.1, gelu="exact"))
    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(np.asarray(loaded(images)), np.asarray(model(images)))
    assert loaded.get_layer("MixerBlock_1").get_config() == model.get_layer("MixerBlock_1").get_config()


def test_from_config_rebuilds_the_same_architecture(images):
    model = randomize(tiny_mixer(input_shape=(8, 20, 3), drop_path_rate=0.2))
    rebuilt = keras_mixer.MlpMixer.from_config(model.get_config())
    assert isinstance(rebuilt, keras_mixer.MlpMixer) and rebuilt.get_config() == model.get_config()
    assert [(w.path, tuple(w.shape)) for w in rebuilt.weights] == [(w.path, tuple(w.shape)) for w in model.weights]
    rebuilt.set_weights(model.get_weights())
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 20, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(rebuilt(x)), np.asarray(model(x)))


def test_weights_argument_loads_a_keras_weights_file(tmp_path, images):
    source = randomize(tiny_mixer())
    path = tmp_path / "tiny.weights.h5"
    source.save_weights(path)
    loaded = tiny_mixer(weights=path)
    np.testing.assert_array_equal(np.asarray(loaded(images)), np.asarray(source(images)))


def test_jit_compile_matches_eager_and_trains(images):
    model = randomize(tiny_mixer(drop_path_rate=0.2))
    jitted = tiny_mixer(drop_path_rate=0.2)
    jitted.set_weights(model.get_weights())
    jitted.compile(optimizer=keras.optimizers.SGD(0.01), loss="sparse_categorical_crossentropy", jit_compile=True)
    np.testing.assert_allclose(jitted.predict(images, verbose=0), np.asarray(model(images)), atol=1e-4)
    before = jitted.get_layer("MixerBlock_1").token_mixing.dense_0.kernel.numpy()
    jitted.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    loss = jitted.train_on_batch(images, np.array([0, 1, 2]))
    assert np.isfinite(loss)
    assert np.abs(jitted.get_layer("MixerBlock_1").token_mixing.dense_0.kernel.numpy() - before).max() > 0


def test_mixed_bfloat16_keeps_norm_statistics_and_head_in_float32(images):
    reference = randomize(tiny_mixer())
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = tiny_mixer()
    model.set_weights(reference.get_weights())
    block = model.get_layer("MixerBlock_0")
    assert block.token_mixing.dense_0.compute_dtype == "bfloat16"
    # A block's LayerNorm emits bfloat16, but equal bit for bit to a float32 LayerNorm's output
    # rounded to bfloat16: statistics, scale and offset stay in float32.
    tokens = keras.ops.cast(np.random.default_rng(2).normal(1.0, 3.0, (3, 16, 24)), "bfloat16")
    as_float32 = keras.layers.LayerNormalization(epsilon=1e-6, dtype="float32")
    as_float32.build(tokens.shape)
    as_float32.set_weights(block.layer_norm_0.get_weights())
    out = block.layer_norm_0(tokens)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    expected = keras.ops.cast(as_float32(tokens), "bfloat16")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")),
        keras.ops.convert_to_numpy(keras.ops.cast(expected, "float32")),
    )
    assert model.get_layer("pre_head_layer_norm").compute_dtype == "float32"
    assert model.get_layer("head").compute_dtype == "float32"
    assert all(w.dtype == "float32" for w in model.weights)
    out = np.asarray(model(images))
    assert out.dtype == np.float32
    expected = np.asarray(reference(images))
    assert np.abs(out - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(input_shape=(18, 16, 3)), ValueError, r"height 18 .*patch size 4.*16 and 20"),
        (dict(input_shape=(16, 30, 3)), ValueError, r"width 30 .*patch size 4"),
        (dict(input_shape=(None, 16, 3)), ValueError, r"height must be fixed"),
        (dict(input_shape=(16, 16, 0)), ValueError, r"channel count .* got 0"),
        (dict(input_shape=(16, 16)), ValueError, r"\(height, width, channels\)"),
        (dict(include_top=True, pooling="avg"), ValueError, r"pooling='avg'.*include_top=False"),
        (dict(include_top=False, pooling="mean"), ValueError, r"pooling must be one of .* 'mean'"),
        (dict(hidden_dim=0), ValueError, r"hidden_dim must be a positive integer, got 0"),
        (dict(tokens_mlp_dim=-3), ValueError, r"tokens_mlp_dim must be a positive integer, got -3"),
        (dict(channels_mlp_dim=2.5), ValueError, r"channels_mlp_dim must be a positive integer, got 2.5"),
        (dict(num_blocks=0), ValueError, r"num_blocks must be a positive integer, got 0"),
        (dict(patch_size=0), ValueError, r"patch_size must be a positive integer, got 0"),
        (dict(classes=0), ValueError, r"classes must be a positive integer, got 0"),
        (dict(drop_path_rate=1.0), ValueError, r"drop_path_rate must be in \[0, 1\), got 1.0"),
        (dict(gelu="relu"), ValueError, r"gelu must be one of .* 'relu'"),
        (dict(weights="/no/such/mixer.npz"), FileNotFoundError, r"/no/such/mixer.npz"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        tiny_mixer(**kwargs)


def test_wrong_channel_count_at_call_is_named():
    model = tiny_mixer()
    with pytest.raises(ValueError, match=r"expected axis 3 of input shape to have value 3.*\(2, 16, 16, 1\)"):
        model(np.zeros((2, 16, 16, 1), "float32"))


def test_same_model_on_the_jax_backend(tmp_path, images):
    """The model code is backend-agnostic: JAX computes what TensorFlow computes with the same weights."""
    pytest.importorskip("jax")
    model = randomize(tiny_mixer(gelu="exact"))
    model.save_weights(tmp_path / "w.weights.h5")
    np.save(tmp_path / "x.npy", images)
    script = textwrap.dedent(
        f"""
        import sys, keras, numpy as np, keras_mixer
        assert keras.backend.backend() == "jax"
        assert "tensorflow" not in sys.modules  # the package runs where TensorFlow is not installed
        model = keras_mixer.MlpMixer(**{TINY!r}, input_shape=(16, 16, 3), classes=7,
                                     classifier_activation=None, gelu="exact")
        model.load_weights({str(tmp_path / "w.weights.h5")!r})
        np.save({str(tmp_path / "y.npy")!r}, np.asarray(model(np.load({str(tmp_path / "x.npy")!r}))))
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(model(images)), atol=1e-4)
