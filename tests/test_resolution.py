"""Block-diagonal token-MLP expansion (paper, Appendix C): exactness, size, training, loading."""

import logging

import keras
import numpy as np
import pytest
from conftest import randomize, tiny_mixer

import keras_mixer
from keras_mixer.model.resolution_expansion import token_order


def _tiles(rng, factors, size):
    """Kh x Kw random images of `size`, and the big image they form."""
    kh, kw = factors
    tiles = rng.uniform(0, 255, (kh, kw, 2, *size, 3)).astype("float32")
    big = np.concatenate([np.concatenate(list(row), axis=2) for row in tiles], axis=1)
    return tiles, big


@pytest.mark.parametrize("size, factors", [((16, 16), (2, 2)), ((12, 16), (3, 2))])
def test_expanded_model_mixes_each_tile_as_the_original(size, factors):
    original = randomize(tiny_mixer(input_shape=(*size, 3)))
    gh, gw = size[0] // 4, size[1] // 4
    tiles, big = _tiles(np.random.default_rng(0), factors, size)
    expanded = keras_mixer.expand_resolution(original, big.shape[1:3])
    assert expanded.input_shape == (None, *big.shape[1:])

    small_features = keras_mixer.token_feature_model(original)
    big_features = keras_mixer.token_feature_model(expanded)(big)
    for a in range(factors[0]):
        for b in range(factors[1]):
            tile_features = small_features(tiles[a, b])
            for name, features in big_features.items():
                grid = np.asarray(features).reshape(2, factors[0] * gh, factors[1] * gw, -1)  # row-major
                placed = grid[:, a * gh : (a + 1) * gh, b * gw : (b + 1) * gw].reshape(2, gh * gw, -1)
                np.testing.assert_allclose(placed, np.asarray(tile_features[name]), atol=1e-5, err_msg=name)

    def pre_logits(model, x):
        return np.asarray(keras.Model(model.input, model.get_layer("avg_pool").output)(x))

    tile_mean = np.mean(
        [pre_logits(original, tiles[a, b]) for a in range(factors[0]) for b in range(factors[1])], axis=0
    )
    np.testing.assert_allclose(pre_logits(expanded, big), tile_mean, atol=1e-5)


def test_token_order_is_a_permutation_that_groups_sub_grids():
    order = token_order((2, 3), (2, 2))
    assert sorted(order) == list(range(24))
    # Sub-grids of 2x3 = 6 tokens each, concatenated: top-left 0-5, top-right 6-11, bottom-left 12-17.
    assert order[3] == 6  # row 0, column 3: top-right sub-grid, its first token
    assert order[6] == 3  # row 1, column 0: top-left sub-grid, local row 1 column 0
    assert order[12] == 12 and order[23] == 23  # rows 2 and 3 start and end the bottom sub-grids


def test_parameter_count_follows_the_formula():
    original = tiny_mixer(num_blocks=3)  # S = 16, D_S = 12
    expanded = keras_mixer.expand_resolution(original, (32, 48))  # K = 2 * 3 = 6

    def token_mlp(s, d):
        return s * d + d + d * s + s

    delta = 3 * (token_mlp(16 * 6, 12 * 6) - token_mlp(16, 12))
    assert expanded.count_params() == original.count_params() + delta
    assert expanded.get_layer("MixerBlock_0").tokens_mlp_dim == 72
    assert expanded.get_layer("head").kernel.shape == original.get_layer("head").kernel.shape


def test_full_size_b16_expands_to_448():
    original = keras_mixer.MixerB16(include_top=False, pooling="avg")
    expanded = keras_mixer.expand_resolution(original, 448)
    kernel = expanded.get_layer("MixerBlock_0").token_mixing.dense_0.kernel
    assert tuple(kernel.shape) == (784, 1536)
    assert expanded.output_shape == (None, 768)
    keras.backend.clear_session()


def test_expanded_model_trains_and_saves(tmp_path):
    expanded = keras_mixer.expand_resolution(randomize(tiny_mixer()), (32, 32))
    before = expanded.get_layer("MixerBlock_0").token_mixing.dense_0.kernel.numpy()
    off_block = before == 0
    assert off_block.mean() > 0.7  # block-diagonal: 3 of 4 blocks are zero
    expanded.compile(
        optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    expanded.train_on_batch(x, np.array([0, 1, 2, 3]))
    after = expanded.get_layer("MixerBlock_0").token_mixing.dense_0.kernel.numpy()
    assert np.abs(after - before).max() > 0 and (after[off_block] != 0).any()  # gradients reach all weights
    expanded.save(tmp_path / "expanded.keras")
    loaded = keras.saving.load_model(tmp_path / "expanded.keras")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(expanded(x)))


@pytest.mark.parametrize("kind", ["npz", "keras"])
def test_pretrained_weights_into_a_bigger_input_expand_automatically(tmp_path, caplog, kind):
    original = randomize(tiny_mixer())
    path = tmp_path / f"w.{kind}"
    keras_mixer.save_npz(original, path) if kind == "npz" else original.save(path)
    with caplog.at_level(logging.INFO, logger="keras_mixer"):
        big = tiny_mixer(weights=path, input_shape=(32, 48, 3))
    assert "expanding to 8x12" in caplog.text
    reference = keras_mixer.expand_resolution(original, (32, 48))
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 48, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(big(x)), np.asarray(reference(x)))


def test_sizes_that_are_not_multiples_are_refused(tmp_path):
    original = tiny_mixer()
    with pytest.raises(ValueError, match=r"16x16 to 24x32.*integer multiple.*32x16"):
        keras_mixer.expand_resolution(original, (24, 32))
    with pytest.raises(ValueError, match=r"16x16 to 8x16"):
        keras_mixer.expand_resolution(original, (8, 16))
    keras_mixer.save_npz(original, tmp_path / "w.npz")
    with pytest.raises(ValueError, match=r"16 tokens and no patch grid divides the requested 6x6"):
        tiny_mixer(weights=tmp_path / "w.npz", input_shape=(24, 24, 3))
