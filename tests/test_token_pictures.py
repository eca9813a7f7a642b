"""Token-mixing pictures (paper Fig. 5): units on the right grid cells, opposite-phase pairs side by
side, expanded models drawn as their trained tile, and the command's output and errors.

The weights are set by hand, so every expected picture is known without running the code under test.
"""

import json
import os

import numpy as np
import pytest
from conftest import randomize, tiny_mixer
from matplotlib.image import imread
from runs import assert_one_line_error, trainer

import keras_mixer
from keras_mixer.studies import token_pictures_cli
from keras_mixer.studies.token_pictures import chance_cosine, draw, opposite_phase_order, token_mixing_units
from keras_mixer.weights_io.official_keys import save_npz

# 4x4 patterns (row, column): a horizontal and a vertical ramp, a checkerboard (the highest
# frequency a grid holds) and one-hot tokens. Ramps, checkerboard and one-hots are pairwise at a
# cosine above -0.5, so only the hand-made (p, -c p) couples may pair.
RAMP_X = np.tile(np.arange(4) - 1.5, (4, 1))
RAMP_Y = RAMP_X.T
CHECKER = (-1.0) ** np.add.outer(np.arange(4), np.arange(4))


def one_hot(row, col, value=1.0, shape=(4, 4)):
    image = np.zeros(shape)
    image[row, col] = value
    return image


def token_grid(model):
    """[gh, gw] int: the token index the stem gives each patch, found by lighting one patch at a time."""
    (ph, pw), (height, width, channels), (gh, gw) = model.patch_size, model.image_shape, model.grid_size
    images = np.zeros((gh * gw + 1, height, width, channels), "float32")  # the last one stays dark
    for k, (r, c) in enumerate(np.ndindex(gh, gw)):
        images[k, r * ph : (r + 1) * ph, c * pw : (c + 1) * pw] = 1.0
    tokens = np.asarray(model.get_layer("stem")(images))
    changed = np.abs(tokens[:-1] - tokens[-1]).max(axis=2) > 0  # [patches, tokens]
    assert (changed.sum(axis=1) == 1).all()
    return changed.argmax(axis=1).reshape(gh, gw)


def set_units(model, block, images):
    """Makes unit u of the block's first token-mixing layer weigh patch (r, c) by images[u][r, c]."""
    tokens = token_grid(model)
    kernel = np.zeros((tokens.size, len(images)), "float32")
    for u, image in enumerate(images):
        kernel[tokens.reshape(-1), u] = np.reshape(image, -1)
    model.get_layer(f"MixerBlock_{block}").token_mixing.dense_0.kernel.assign(kernel)


def test_units_are_kernel_columns_on_a_non_square_grid():
    model = tiny_mixer(input_shape=(16, 32, 3))  # patch 4: 4 rows x 8 columns of patches
    assert model.grid_size == (4, 8)
    cells = [(0, 7), (3, 0), (0, 0), (3, 7), (1, 2), (2, 5), (0, 3), (1, 6), (2, 1), (3, 4), (1, 0), (2, 7)]
    images = [one_hot(r, c, u + 1.0, (4, 8)) for u, (r, c) in enumerate(cells)]
    set_units(model, 0, images)

    units, info = token_mixing_units(model, 0)

    assert units.shape == (12, 4, 8) and units.dtype == np.float32
    np.testing.assert_array_equal(units, np.stack(images))
    assert units[0, 0, 7] == 1.0  # the top-right patch is drawn top right
    assert info == dict(grid=[4, 8], model_grid=[4, 8], expansion=None, units=12)


def test_opposite_phase_pairs_sit_side_by_side_lowest_frequency_first():
    units = np.stack(
        [
            RAMP_X, one_hot(0, 0, 2), CHECKER, -0.5 * RAMP_X, one_hot(1, 2), -3 * CHECKER,
            2 * RAMP_Y, one_hot(3, 3, 0.5), -RAMP_Y, one_hot(2, 0), one_hot(0, 3),
        ]
    )  # fmt: skip  # 11 units: 3 pairs and 5 that have no opposite (an odd count)

    order, pairs, unpaired = opposite_phase_order(units)

    assert sorted(order.tolist()) == list(range(11))
    assert {frozenset(p[:2]) for p in pairs} == {frozenset((0, 3)), frozenset((2, 5)), frozenset((6, 8))}
    np.testing.assert_allclose([p[2] for p in pairs], -1.0, atol=1e-6)
    for k, (i, j, _) in enumerate(pairs):
        assert order[2 * k : 2 * k + 2].tolist() == [i, j]  # partners next to each other
    assert {pairs[2][0], pairs[2][1]} == {2, 5}  # the checkerboard has the highest frequency: last
    assert sorted(unpaired) == [1, 4, 7, 9, 10] and order[6:].tolist() == unpaired
    # The threshold: a ramp and a one-hot on its low end have a cosine of -1.5 / sqrt(20) = -0.34.
    ramp_and_dot = np.stack([RAMP_X, one_hot(0, 0)])
    assert [p[:2] for p in opposite_phase_order(ramp_and_dot, pair_below=-0.3)[1]] == [(0, 1)]
    assert opposite_phase_order(ramp_and_dot, pair_below=-0.4)[1] == []


def test_the_default_threshold_pairs_opposites_but_not_chance_coincidences():
    rng = np.random.default_rng(0)
    # 32 random units on a 4x4 grid: -0.5 finds several chance "pairs", the default about none.
    counts = {threshold: [] for threshold in (-0.5, None)}
    for _ in range(20):
        units = rng.normal(size=(32, 4, 4))
        for threshold in counts:
            counts[threshold].append(len(opposite_phase_order(units, threshold)[1]))
    assert np.mean(counts[-0.5]) > 3 and np.mean(counts[None]) < 0.5, counts
    # True opposites among them are still found.
    units = rng.normal(size=(32, 4, 4))
    units[7] = -0.9 * units[3] + 0.05 * rng.normal(size=(4, 4))
    assert (3, 7) in [p[:2] for p in opposite_phase_order(units)[1]]
    assert chance_cosine(196, 384) == -0.5  # B/16: random 196-weight units never reach -0.5


def red_and_blue(pixels):
    """(red, blue) masks of RGBA pixels [..., 4]: clearly red or clearly blue in RdBu_r."""
    return pixels[..., 0] - pixels[..., 2] > 0.2, pixels[..., 2] - pixels[..., 0] > 0.2


def test_png_pixels_show_each_unit_in_place(tmp_path):
    model = tiny_mixer(input_shape=(16, 32, 3))
    images = [one_hot(0, 7, 1.0, (4, 8)), one_hot(0, 7, -1.0, (4, 8))]
    images += [one_hot(r, c, 1.0, (4, 8)) for r, c in [(1, 1), (2, 2), (3, 3), (1, 4), (2, 5), (3, 6), (0, 0), (3, 0)]]
    images += [one_hot(0, 1, 0.5, (4, 8)) + one_hot(0, 2, -0.25, (4, 8)), one_hot(3, 7, -2.0, (4, 8))]
    set_units(model, 1, images)

    (result,) = draw(model, tmp_path / "tokens.png", blocks=[1])
    png = imread(tmp_path / "tokens.png")
    z = result["token_pixels"]

    def cell(unit):
        x, y = result["cells"][result["drawn"].index(unit)]
        return png[y : y + 4 * z, x : x + 8 * z]

    for unit, image in enumerate(images):
        red, blue = red_and_blue(cell(unit))
        expected = np.kron(image, np.ones((z, z)))  # each token a z x z square
        np.testing.assert_array_equal(red, expected > 0, err_msg=f"unit {unit}")
        np.testing.assert_array_equal(blue, expected < 0, err_msg=f"unit {unit}")
    assert cell(0)[0, -1, 0] < 0.5  # the dark end of the map: the unit's own max |w|

    # Units 0 and 1 (+1 and -1 on the top-right patch) are the only pair: side by side, first.
    assert result["drawn"][:2] in ([0, 1], [1, 0])
    (x0, y0), (x1, y1) = result["cells"][:2]
    assert y0 == y1 and 8 * z < x1 - x0 < 9 * z
    sidecar = json.loads((tmp_path / "tokens.json").read_text())
    (block,) = sidecar["blocks"]
    assert block["block"] == 1 and block["grid"] == [4, 8] and block["units"] == 12
    assert [sorted(p["units"]) for p in block["pairs"]] == [[0, 1]] and block["pairs"][0]["cosine"] == -1.0
    assert block["drawn"] == result["drawn"] and sorted(block["unpaired"]) == list(range(2, 12))


def test_block_scale_keeps_magnitudes(tmp_path):
    model = tiny_mixer()
    images = [one_hot(0, 0, 1.0), one_hot(3, 3, 100.0)] + [one_hot(1, c, 100.0) for c in range(4)] * 2 + [RAMP_X] * 2
    set_units(model, 0, images)
    pixel = {}
    for scale in ("unit", "block"):
        (result,) = draw(model, tmp_path / f"{scale}.png", blocks=[0], scale=scale)
        png = imread(tmp_path / f"{scale}.png")
        x, y = result["cells"][result["drawn"].index(0)]
        pixel[scale] = png[y, x, :3]  # unit 0's only non-zero token, top left
    assert pixel["unit"][0] - pixel["unit"][2] > 0.2  # saturated red at its own scale
    assert pixel["block"].min() > 0.9  # 1/100 of the block's max: nearly white


def test_expanded_model_is_drawn_as_its_trained_tile(tmp_path):
    model = randomize(tiny_mixer(), seed=3)
    for size, factors in (((32, 16), [2, 1]), ((32, 32), [2, 2]), ((48, 48), [3, 3])):
        expanded = keras_mixer.expand_resolution(model, size)
        for block in (0, 1):
            units, info = token_mixing_units(expanded, block)
            np.testing.assert_array_equal(units, token_mixing_units(model, block)[0])
            assert info["expansion"] == factors and info["grid"] == [4, 4]
            assert info["model_grid"] == [4 * factors[0], 4 * factors[1]]

    # What a loader builds from a weights file at a larger size is the same expansion.
    save_npz(model, tmp_path / "tiny.npz")
    from keras_mixer.serving.trained_models import load_keras_model

    loaded, _ = load_keras_model(str(tmp_path / "tiny.npz"), image_size=32)
    units, info = token_mixing_units(loaded, 1)
    np.testing.assert_array_equal(units, token_mixing_units(model, 1)[0])
    assert info["expansion"] == [2, 2]

    # Trained after the expansion (an off-diagonal weight no longer 0): the whole grid, every unit.
    kernel = expanded.get_layer("MixerBlock_0").token_mixing.dense_0.kernel
    changed = np.array(kernel.numpy())
    changed[0, -1] = 0.01  # token 0 (top-left tile) feeds a unit of the last tile
    kernel.assign(changed)
    units, info = token_mixing_units(expanded, 0)
    assert info["expansion"] is None and units.shape == (108, 12, 12)


def test_sparse_units_are_not_mistaken_for_an_expansion():
    # Every unit lies inside one 2x2 (and one 1x2) sub-grid, but the tiles differ: not an expansion.
    # (With all 16 values equal this kernel *is* the 4x2 expansion of a 1x2 identity; trained
    # weights are never exact copies.)
    model = tiny_mixer(tokens_mlp_dim=16)
    images = [one_hot(k // 4, k % 4, k + 1.0) for k in range(16)]  # unit k one-hot on patch k, row-major
    set_units(model, 0, images)
    units, info = token_mixing_units(model, 0)
    assert info["expansion"] is None
    np.testing.assert_array_equal(units, np.stack(images))


def test_bad_values_name_what_was_expected(tmp_path):
    model = tiny_mixer()
    with pytest.raises(ValueError, match=r"block 2 is out of range: .* has 2 blocks \(0 to 1\)"):
        token_mixing_units(model, 2)
    with pytest.raises(ValueError, match="must be a .png"):
        draw(model, tmp_path / "tokens.jpg")
    with pytest.raises(ValueError, match="scale must be one of unit, block, got 'max'"):
        draw(model, tmp_path / "tokens.png", scale="max")
    with pytest.raises(ValueError, match="cosine between -1 and 0, got 0.5"):
        opposite_phase_order(np.stack([RAMP_X, -RAMP_X]), pair_below=0.5)
    with pytest.raises(ValueError, match=r"'x' is not a block index"):
        token_pictures_cli._block_list(["0", "x"])
    assert token_pictures_cli._block_list(["2", " 0", "2"]) == [2, 0]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        token_pictures_cli._output_folder(str(tmp_path / "file" / "sub" / "t.png"))
    token_pictures_cli._output_folder(str(tmp_path / "new" / "t.png"))
    assert os.path.isdir(tmp_path / "new")
    assert not os.path.exists(tmp_path / "tokens.png")  # the failed draws wrote nothing


def test_command_draws_a_weights_file_at_a_larger_size(tmp_path):
    model = randomize(tiny_mixer(), seed=5)
    rng = np.random.default_rng(0)
    images = [np.full((4, 4), 0.3), np.full((4, 4), -0.6)] + [rng.normal(size=(4, 4)) for _ in range(10)]
    set_units(model, 1, images)  # a uniform pair: frequency 0, drawn first
    save_npz(model, tmp_path / "tiny.npz")
    out = tmp_path / "new" / "tokens.png"  # a missing folder is created

    result = trainer("visualize", "--source", tmp_path / "tiny.npz", "--image_size", 32, "--out", out, "--units", 6)

    assert str(out) in result.stdout
    assert imread(out).shape[2] == 4
    sidecar = json.loads((tmp_path / "new" / "tokens.json").read_text())
    assert [b["block"] for b in sidecar["blocks"]] == [0, 1]  # the default 0,1,2 cut to 2 blocks
    block = sidecar["blocks"][1]
    assert block["expansion"] == [2, 2] and block["grid"] == [4, 4] and block["model_grid"] == [8, 8]
    assert block["units"] == 12 and len(block["drawn"]) == 6 and block["drawn"][:2] == [0, 1]
    assert block["pairs"][0] == dict(units=[0, 1], cosine=-1.0)


def test_command_rejects_a_block_beyond_the_model(tmp_path):
    tiny_mixer().save(tmp_path / "tiny.keras")
    result = trainer(
        "visualize", "--source", tmp_path / "tiny.keras", "--blocks", "0,7", "--out", tmp_path / "t.png", check=False
    )
    assert_one_line_error(result, "block 7", "2 blocks (0 to 1)")
    assert not os.path.exists(tmp_path / "t.png")
