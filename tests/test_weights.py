"""Checkpoints in and out: timm and official-layout parity, presets, heads, errors."""

import logging
import os
import sys
import zipfile

import keras
import numpy as np
import pytest
from conftest import TINY, randomize, tiny_mixer
from runs import ROOT

import keras_mixer
from keras_mixer import WeightsError
from keras_mixer.weights_io import file_formats, official_keys

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # flax_mixer, the Flax peer
torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


def relative_error(actual, expected):
    return np.abs(np.asarray(actual) - np.asarray(expected)).max() / np.abs(np.asarray(expected)).max()


def random_timm(model, seed=0):
    """Random weights everywhere, the zero-initialised head included, else logits say nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("weight") and p.ndim == 1 else 0.0  # LayerNorm scales near 1
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def timm_outputs(model, images):
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2))
        features = model.forward_features(x)
        return model.forward_head(features).numpy(), model.forward_head(features, pre_logits=True).numpy()


@pytest.mark.parametrize(
    "timm_name, variant, size, fmt",
    [
        ("mixer_s32_224", "S/32", (224, 224), "pth"),
        pytest.param("mixer_b16_224", "B/16", (224, 224), "safetensors", marks=pytest.mark.slow),  # 12-16 s
        ("mixer_s16_224", "S/16", (160, 224), "pth"),
    ],
)
def test_timm_parity(tmp_path, timm_name, variant, size, fmt):
    source = random_timm(timm.create_model(timm_name, pretrained=False, num_classes=10, img_size=size))
    path = tmp_path / f"timm.{fmt}"
    if fmt == "pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), path)
    images = np.random.default_rng(0).uniform(-1, 1, (2, *size, 3)).astype("float32")
    logits, pre_logits = timm_outputs(source, images)

    common = dict(weights=path, input_shape=(*size, 3), include_preprocessing=False)
    model = keras_mixer.create_model(variant, classifier_activation=None, **common)
    assert model.get_layer("MixerBlock_0").gelu == "exact"  # picked from the source
    assert model.output_shape == (None, 10)  # class count taken from the checkpoint
    assert relative_error(model(images), logits) <= 1e-4
    features = keras_mixer.create_model(variant, include_top=False, pooling="avg", **common)
    assert relative_error(features(images), pre_logits) <= 1e-4
    keras.backend.clear_session()


def test_save_timm_loads_into_timm_and_matches(tmp_path, images):
    from safetensors.torch import load_file
    from timm.models.mlp_mixer import MlpMixer as TimmMixer

    model = randomize(tiny_mixer(gelu="exact", include_preprocessing=False))
    keras_mixer.save_timm(model, tmp_path / "tiny.safetensors")
    target = TimmMixer(num_classes=7, img_size=16, patch_size=4, num_blocks=2, embed_dim=24, mlp_ratio=(0.5, 2.0))
    target.load_state_dict(load_file(tmp_path / "tiny.safetensors"), strict=True)
    x = images / 127.5 - 1
    logits, _ = timm_outputs(target.eval(), x)
    assert relative_error(model(x), logits) <= 1e-4


def _flax_params(flax_model, images, seed=0):
    import jax

    params = flax_model.init(jax.random.PRNGKey(seed), images)["params"]
    flat = {
        "/".join(str(k.key) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(params)
    }
    rng = np.random.default_rng(seed)
    flat = {
        k: (1.0 if k.endswith("scale") else 0.0) + 0.2 * rng.normal(size=v.shape).astype("float32")
        for k, v in flat.items()
    }
    nested = {}
    for key, value in flat.items():
        node = nested
        *scopes, leaf = key.split("/")
        for scope in scopes:
            node = node.setdefault(scope, {})
        node[leaf] = value
    return flat, nested


@pytest.mark.parametrize("size", [(16, 16), (12, 20)])
def test_official_layout_parity_with_a_flax_model(tmp_path, size):
    pytest.importorskip("flax")
    from flax_mixer import FlaxMixer

    images = np.random.default_rng(2).uniform(-1, 1, (2, *size, 3)).astype("float32")
    flax_model = FlaxMixer(4, 24, 2, 12, 48, classes=7)
    flat, nested = _flax_params(flax_model, images)
    assert "MixerBlock_1/token_mixing/Dense_0/kernel" in flat and "pre_head_layer_norm/scale" in flat
    np.savez(tmp_path / "official.npz", **flat)
    expected = np.asarray(flax_model.apply({"params": nested}, images))

    model = tiny_mixer(weights=tmp_path / "official.npz", input_shape=(*size, 3), include_preprocessing=False)
    assert model.get_layer("MixerBlock_0").gelu == "tanh"
    assert relative_error(model(images), expected) <= 1e-4


def test_npz_round_trip_is_bit_exact(tmp_path, images):
    model = randomize(tiny_mixer())
    keras_mixer.save_npz(model, tmp_path / "out.npz")
    with np.load(tmp_path / "out.npz", allow_pickle=False) as data:
        assert data["stem/kernel"].shape == (4, 4, 3, 24)
        assert data["MixerBlock_0/token_mixing/Dense_0/kernel"].shape == (16, 12)
        assert "MixerBlock_1/LayerNorm_1/scale" in data.files
    back = tiny_mixer(weights=tmp_path / "out.npz")
    for a, b in zip(model.get_weights(), back.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(back(images)), np.asarray(model(images)))


def test_keras_files_through_the_same_entry_point(tmp_path, images):
    model = randomize(tiny_mixer(gelu="exact"))
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    from_archive = tiny_mixer(weights=tmp_path / "m.keras")
    assert from_archive.get_layer("MixerBlock_0").gelu == "exact"  # read from the archive's config
    np.testing.assert_array_equal(np.asarray(from_archive(images)), np.asarray(model(images)))
    built = tiny_mixer(gelu="exact")
    keras_mixer.load_weights(built, tmp_path / "m.weights.h5")
    np.testing.assert_array_equal(np.asarray(built(images)), np.asarray(model(images)))
    headless = tiny_mixer(weights=tmp_path / "m.keras", include_top=False, pooling="avg")
    assert headless.output_shape == (None, 24)


def test_format_is_recognised_by_content_not_name(tmp_path):
    model = randomize(tiny_mixer())
    keras_mixer.save_npz(model, tmp_path / "a.npz")
    keras_mixer.save_timm(model, tmp_path / "b.safetensors")
    os.rename(tmp_path / "a.npz", tmp_path / "weights.bin")
    os.rename(tmp_path / "b.safetensors", tmp_path / "other.npz")
    assert file_formats.detect_format(tmp_path / "weights.bin") == file_formats.NPZ
    assert file_formats.detect_format(tmp_path / "other.npz") == file_formats.TIMM_SAFETENSORS
    for name in ("weights.bin", "other.npz"):
        loaded = tiny_mixer(weights=tmp_path / name, gelu="tanh")
        for a, b in zip(model.get_weights(), loaded.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_heads(tmp_path, images, caplog):
    source = randomize(tiny_mixer())
    keras_mixer.save_npz(source, tmp_path / "w.npz")
    same = tiny_mixer(weights=tmp_path / "w.npz", classes=None)
    assert same.output_shape == (None, 7)
    np.testing.assert_array_equal(same.get_layer("head").kernel.numpy(), source.get_layer("head").kernel.numpy())

    with caplog.at_level(logging.WARNING, logger="keras_mixer"):
        fresh = tiny_mixer(weights=tmp_path / "w.npz", classes=3)
    assert "head set to zeros" in caplog.text and "7 classes" in caplog.text
    assert not fresh.get_layer("head").kernel.numpy().any() and not fresh.get_layer("head").bias.numpy().any()
    np.testing.assert_array_equal(
        fresh.get_layer("MixerBlock_1").channel_mixing.dense_1.kernel.numpy(),
        source.get_layer("MixerBlock_1").channel_mixing.dense_1.kernel.numpy(),
    )

    headless = tiny_mixer(weights=tmp_path / "w.npz", include_top=False, pooling="avg")
    expected = source.get_layer("avg_pool").output
    features = keras.Model(source.input, expected)(images)
    np.testing.assert_array_equal(np.asarray(headless(images)), np.asarray(features))


def test_presets_fetch_through_keras_cache(tmp_path, monkeypatch, images):
    mirror = tmp_path / "mirror" / "gsam"
    mirror.mkdir(parents=True)
    source = randomize(keras_mixer.MixerS32(input_shape=(64, 64, 3)))
    keras_mixer.save_npz(source, mirror / "Mixer-S_32.npz")
    monkeypatch.setenv("KERAS_MIXER_WEIGHTS_URL", (tmp_path / "mirror").as_uri())
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    loaded = keras_mixer.MixerS32(weights="gsam", input_shape=(64, 64, 3))
    assert os.path.exists(tmp_path / "keras_home" / "models" / "keras_mixer" / "mixer_s32_gsam.npz")
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(source(x)))

    with pytest.raises(
        ValueError, match=r"'imagenet21k' is published for B/16, L/16, not for S/32; presets for it: mixer_s32_gsam"
    ):
        keras_mixer.MixerS32(weights="imagenet21k")
    with pytest.raises(
        ValueError, match=r"'jft' is neither a file or folder .* nor a weights preset; presets: mixer_b16_imagenet1k"
    ):
        keras_mixer.MixerS32(weights="jft")
    with pytest.raises(ValueError, match=r"not for this custom configuration"):
        tiny_mixer(weights="gsam")

    # keras-hub style: the preset name alone gives the architecture, the size and the head.
    model = keras_mixer.MlpMixer.from_preset("mixer_s32_gsam", input_shape=(64, 64, 3))
    assert isinstance(model, keras_mixer.MlpMixer) and model.variant == "S/32" and model.name == "mixer_s32_gsam"
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(source(x)))
    with pytest.raises(ValueError, match=r"Preset 'mixer_s32_gsam' holds S/32 weights, not B/16"):
        keras_mixer.MixerB16(weights="mixer_s32_gsam")


def test_from_preset_reads_the_architecture_and_size_from_a_weights_file(tmp_path, images):
    source = randomize(tiny_mixer(input_shape=(16, 8, 3)))
    keras_mixer.save_timm(source, tmp_path / "tiny.safetensors")
    keras_mixer.save_npz(randomize(tiny_mixer(), seed=3), tmp_path / "square.npz")
    # timm's form: exact GELU; a non-square grid cannot be guessed from the token count.
    with pytest.raises(ValueError, match=r"trained on 8 patches, not a square grid: give input_shape"):
        keras_mixer.MlpMixer.from_preset(tmp_path / "tiny.safetensors")
    model = keras_mixer.MlpMixer.from_preset(tmp_path / "tiny.safetensors", input_shape=(16, 8, 3))
    assert model.get_config() == {
        **source.get_config(),
        "gelu": "exact",
        "name": "tiny",
        "classifier_activation": "softmax",
    }
    square = keras_mixer.MlpMixer.from_preset(tmp_path / "square.npz", classifier_activation=None)
    assert (square.image_shape, square.classes, square.gelu) == ((16, 16, 3), 7, "tanh")
    np.testing.assert_array_equal(np.asarray(square(images)), np.asarray(randomize(tiny_mixer(), seed=3)(images)))
    # A .keras file carries its whole config; a larger size expands the resolution.
    tiny_mixer().save(tmp_path / "m.keras")
    assert keras_mixer.MlpMixer.from_preset(tmp_path / "m.keras").get_config() == {
        **tiny_mixer().get_config(),
        "name": "m",
    }
    big = keras_mixer.MlpMixer.from_preset(tmp_path / "square.npz", input_shape=(32, 16, 3))
    assert (big.grid_size, big.tokens_mlp_dim) == ((8, 4), 2 * TINY["tokens_mlp_dim"])


def test_preset_listing_names_every_release_with_its_metadata():
    listed = {name: meta for name, meta in keras_mixer.list_presets().items() if not name.startswith("hf://")}
    # The published files: imagenet1k B/16, L/16; imagenet21k B/16, L/16; sam B/16, B/32; gsam S/8..B/32.
    assert len(listed) == 11 and listed["mixer_l16_imagenet21k"]["classes"] == 21843
    for name, meta in listed.items():
        assert name == "mixer_" + meta["variant"].replace("/", "").lower() + "_" + meta["release"]
        assert meta["file"] == f"{meta['release']}/Mixer-{meta['variant'].replace('/', '_')}.npz"
        # resize 256 (bilinear, the official tf.image.resize), crop 224
        assert meta["eval_preprocessing"] == {"eval_resize": "crop", "crop_ratio": 0.875, "interpolation": "bilinear"}
        assert meta["variant"] in keras_mixer.VARIANTS and meta["gelu"] == "tanh"
    assert listed["mixer_b16_imagenet1k"]["top1"] == pytest.approx(0.7644)  # the paper's Table 2
    listed["mixer_b16_sam"]["classes"] = 5  # a copy: the table itself is not changed
    assert keras_mixer.list_presets()["mixer_b16_sam"]["classes"] == 1000


def _npz_with(tmp_path, params):
    path = tmp_path / "edited.npz"
    np.savez(path, **params)
    return path


def _assert_unchanged(model, before):
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_key_and_shape_errors_leave_the_model_unchanged(tmp_path):
    params = official_keys.model_params(randomize(tiny_mixer()))
    target = tiny_mixer()
    before = target.get_weights()

    missing = {k: v for k, v in params.items() if k != "MixerBlock_1/LayerNorm_0/scale"}
    with pytest.raises(WeightsError, match=r"missing keys \(1\): MixerBlock_1/LayerNorm_0/scale"):
        keras_mixer.load_weights(target, _npz_with(tmp_path, missing))
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): extra/thing"):
        keras_mixer.load_weights(target, _npz_with(tmp_path, {**params, "extra/thing": np.zeros(2)}))
    wide = {**params, "MixerBlock_0/channel_mixing/Dense_0/kernel": np.zeros((24, 50), "float32")}
    with pytest.raises(
        WeightsError, match=r"'MixerBlock_0/channel_mixing/Dense_0/kernel': weights file \(24, 50\), model \(24, 48\)"
    ):
        keras_mixer.load_weights(target, _npz_with(tmp_path, wide))
    _assert_unchanged(target, before)

    bigger = tiny_mixer(input_shape=(32, 16, 3))
    with pytest.raises(
        WeightsError, match=r"token_mixing/Dense_0/kernel.*\(16, 12\).*\(32, 12\).*resolution expansion"
    ):
        keras_mixer.load_weights(bigger, _npz_with(tmp_path, params))
    grey = tiny_mixer(input_shape=(16, 16, 1))
    with pytest.raises(WeightsError, match=r"'stem/kernel': weights file \(4, 4, 3, 24\), model \(4, 4, 1, 24\)"):
        keras_mixer.load_weights(grey, _npz_with(tmp_path, params))


def test_corrupt_and_unsafe_files_are_refused(tmp_path):
    model = randomize(tiny_mixer())
    keras_mixer.save_npz(model, tmp_path / "good.npz")
    keras_mixer.save_timm(model, tmp_path / "good.safetensors")
    torch.save({k: torch.zeros(1) for k in ("a", "b")}, tmp_path / "good.pth")
    target = tiny_mixer()
    before = target.get_weights()
    for name in ("good.npz", "good.safetensors", "good.pth"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(WeightsError, match=r"corrupt|truncated|could not be read"):
            keras_mixer.load_weights(target, tmp_path / f"cut-{name}")
    np.savez(tmp_path / "objects.npz", **{"stem/kernel": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(WeightsError, match=r"object arrays.*pickle"):
        keras_mixer.load_weights(target, tmp_path / "objects.npz")
    (tmp_path / "legacy.pth").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(WeightsError, match=r"legacy pickled torch file"):
        keras_mixer.load_weights(target, tmp_path / "legacy.pth")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(WeightsError, match=r"Unrecognised weights file .*notes.txt"):
        keras_mixer.load_weights(target, tmp_path / "notes.txt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.md", "hi")
    with pytest.raises(WeightsError, match=r"neither a .npz, a .keras nor a torch file"):
        keras_mixer.load_weights(target, tmp_path / "other.zip")
    with pytest.raises(FileNotFoundError, match=r"missing.npz"):
        keras_mixer.load_weights(target, tmp_path / "missing.npz")
    _assert_unchanged(target, before)


def test_failed_write_keeps_the_existing_file(tmp_path, monkeypatch):
    model = randomize(tiny_mixer())
    path = tmp_path / "w.npz"
    keras_mixer.save_npz(model, path)
    original = path.read_bytes()

    def broken_savez(f, **params):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        keras_mixer.save_npz(randomize(tiny_mixer(), seed=5), path)
    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["w.npz"]  # no temporary file left behind
