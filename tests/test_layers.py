"""The paper's equivalences and stochastic depth, on random weights."""

import keras
import numpy as np
import pytest
from conftest import randomize, tiny_mixer
from keras import layers

from keras_mixer import DropPath, MixerBlock, MlpBlock, PatchStem, drop_path_schedule


def gelu(x):
    return keras.activations.gelu(x, approximate=True)


def test_stem_is_row_major_patch_projection():
    stem = PatchStem(5, 4)
    images = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype("float32")
    tokens = np.asarray(stem(images))
    kernel, bias = (np.asarray(w) for w in stem.get_weights())
    assert tokens.shape == (2, 6, 5)
    for row in range(2):
        for col in range(3):
            patch = images[:, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4, :]
            expected = np.einsum("bhwc,hwcd->bd", patch, kernel) + bias
            np.testing.assert_allclose(tokens[:, row * 3 + col], expected, atol=1e-5)


def test_channel_mixing_equals_1x1_conv(images):
    model = randomize(tiny_mixer())
    block = model.get_layer("MixerBlock_0").channel_mixing
    tokens = np.random.default_rng(2).normal(size=(3, 16, 24)).astype("float32")
    conv_0, conv_1 = layers.Conv2D(48, 1), layers.Conv2D(24, 1)
    conv_0.build((None, 4, 4, 24))
    conv_1.build((None, 4, 4, 48))
    conv_0.set_weights([block.dense_0.kernel.numpy().reshape(1, 1, 24, 48), block.dense_0.bias.numpy()])
    conv_1.set_weights([block.dense_1.kernel.numpy().reshape(1, 1, 48, 24), block.dense_1.bias.numpy()])
    grid = tokens.reshape(3, 4, 4, 24)
    by_conv = np.asarray(conv_1(gelu(conv_0(grid)))).reshape(3, 16, 24)
    np.testing.assert_allclose(np.asarray(block(tokens)), by_conv, atol=1e-5)


def _shared_depthwise(kernel_2d, channels, bias, grid):
    """A depthwise conv whose receptive field is the whole grid and whose kernel all channels share."""
    height, width = grid
    outputs = kernel_2d.shape[-1]
    conv = layers.DepthwiseConv2D((height, width), depth_multiplier=outputs)
    conv.build((None, height, width, channels))
    depthwise = np.broadcast_to(kernel_2d.reshape(height, width, 1, outputs), (height, width, channels, outputs))
    conv.set_weights([np.ascontiguousarray(depthwise), np.tile(bias, channels)])
    return conv


def test_token_mixing_equals_shared_full_depthwise_conv():
    model = randomize(tiny_mixer())
    block = model.get_layer("MixerBlock_0").token_mixing
    tokens = np.random.default_rng(3).normal(size=(3, 16, 24)).astype("float32")  # [B, S, C]
    expected = np.asarray(block(tokens.transpose(0, 2, 1))).transpose(0, 2, 1)

    w0, b0 = block.dense_0.kernel.numpy(), block.dense_0.bias.numpy()  # [S, D_S]
    w1, b1 = block.dense_1.kernel.numpy(), block.dense_1.bias.numpy()  # [D_S, S]
    conv_0 = _shared_depthwise(w0, 24, b0, (4, 4))
    hidden = gelu(conv_0(tokens.reshape(3, 4, 4, 24)))  # [B, 1, 1, C * D_S], channel-major
    hidden = np.asarray(hidden).reshape(3, 24, 12).transpose(0, 2, 1).reshape(3, 1, 12, 24)
    conv_1 = _shared_depthwise(w1, 24, b1, (1, 12))
    by_conv = np.asarray(conv_1(hidden)).reshape(3, 24, 16).transpose(0, 2, 1)
    np.testing.assert_allclose(by_conv, expected, atol=1e-5)


def _permute_patches(images, order, patch=4):
    """Moves patch order[k] of each image to token position k (row-major)."""
    b, h, w, c = images.shape
    grid = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    grid = grid.reshape(b, -1, patch, patch, c)[:, order]
    grid = grid.reshape(b, h // patch, w // patch, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(b, h, w, c)


def test_no_position_embedding_token_order_matters_and_weight_permutation_restores(images):
    model = randomize(tiny_mixer(include_top=False))  # token outputs [B, S, C]
    order = np.random.default_rng(4).permutation(16)
    shuffled = _permute_patches(images, order)
    tokens = np.asarray(model(images))
    assert np.abs(np.asarray(model(shuffled))[:, np.argsort(order)] - tokens).max() > 1e-2

    permuted = type(model).from_config(model.get_config())
    permuted.set_weights(model.get_weights())
    for i in range(2):
        mlp = permuted.get_layer(f"MixerBlock_{i}").token_mixing
        mlp.dense_0.kernel.assign(mlp.dense_0.kernel.numpy()[order])
        mlp.dense_1.kernel.assign(mlp.dense_1.kernel.numpy()[:, order])
        mlp.dense_1.bias.assign(mlp.dense_1.bias.numpy()[order])
    np.testing.assert_allclose(np.asarray(permuted(shuffled)), tokens[:, order], atol=1e-4)


def test_drop_path_schedule_rises_linearly_to_rate():
    model = tiny_mixer(num_blocks=4, drop_path_rate=0.3)
    rates = [model.get_layer(f"MixerBlock_{i}").drop_path.rate for i in range(4)]
    np.testing.assert_allclose(rates, [0.0, 0.1, 0.2, 0.3])
    assert drop_path_schedule(0.3, 1) == [0.0]


def test_drop_path_measured_keep_rate_per_block_and_rescaling():
    model = tiny_mixer(num_blocks=4, drop_path_rate=0.6)
    n = 20000
    for i in range(4):
        layer = model.get_layer(f"MixerBlock_{i}").drop_path
        out = np.asarray(layer(np.ones((n, 3, 2), "float32"), training=True))
        keep = 1.0 - 0.6 * i / 3
        # One mask value per sample, shared by all its elements.
        assert np.all(out == out[:, :1, :1])
        kept = out[:, 0, 0] != 0
        sigma = np.sqrt(keep * (1 - keep) / n)
        assert abs(kept.mean() - keep) <= 4 * sigma + 1e-12, (i, kept.mean(), keep)
        # Kept branches are rescaled by 1 / keep so the expectation equals inference.
        np.testing.assert_allclose(out[kept, 0, 0], 1.0 / keep, rtol=1e-6)


def test_drop_path_draws_a_new_mask_per_call():
    layer = DropPath(0.5, seed=3)
    first = np.asarray(layer(np.ones((500, 1), "float32"), training=True))
    second = np.asarray(layer(np.ones((500, 1), "float32"), training=True))
    assert (first != second).any()


def test_stochastic_depth_is_identity_at_inference(images):
    dropped = randomize(tiny_mixer(drop_path_rate=0.5, dropout_rate=0.3))
    plain = tiny_mixer()
    plain.set_weights(dropped.get_weights())
    np.testing.assert_allclose(np.asarray(dropped(images, training=False)), np.asarray(plain(images)), atol=1e-6)
    assert np.abs(np.asarray(dropped(images, training=True)) - np.asarray(plain(images))).max() > 1e-3


@pytest.mark.parametrize(
    "make",
    [
        lambda: PatchStem(8, (2, 4)),
        lambda: MlpBlock(8, dropout_rate=0.1, gelu="exact"),
        lambda: DropPath(0.2, seed=5),
        lambda: MixerBlock(4, 16, dropout_rate=0.1, drop_path_rate=0.2, gelu="exact", seed=1),
        lambda: MixerBlock(4, 16, recompute=True),
    ],
)
def test_layers_round_trip_through_config(make):
    layer = make()
    clone = layer.__class__.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


def test_recompute_gives_the_same_gradients_on_tensorflow_and_is_off_by_default_there(images):
    """recompute=True (tf.recompute_grad around each GELU) changes nothing but what the backward pass
    keeps; the JAX side, and the memory it saves, is tested in test_jax_step.py."""
    import tensorflow as tf

    from keras_mixer.model.layers import recomputing

    assert recomputing(None) is False  # the TF backend
    gradients = {}
    for recompute in (False, True):
        model = randomize(tiny_mixer(recompute=recompute))
        assert all(block.token_mixing.recompute is recompute for block in model.layers if isinstance(block, MixerBlock))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(model(images, training=True)))
        gradients[recompute] = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
    for plain, recomputed in zip(gradients[False], gradients[True]):
        np.testing.assert_allclose(recomputed, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_recompute_must_be_a_bool_or_none(value):
    with pytest.raises(ValueError, match=rf"recompute must be True, False or None .*got {value!r}"):
        tiny_mixer(recompute=value)
