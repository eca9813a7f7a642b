"""The NumPy/Pillow reader (`data.arrays`): the tf.data pipeline's evaluation batches of the
digits and image folders and its host shards, TF's resizes, reproducible and resumable training
streams, no TensorFlow import. (Both readers' images of photographs and crop distributions:
tests/test_readers_agree.py.)"""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from runs import ENV, JAX, ROOT

from keras_mixer import data
from keras_mixer.data import arrays
from keras_mixer.data.sources import Source
from keras_mixer.model.pixels import EvalPreprocessing

# Odd sizes, both orientations, smaller and larger than the 16 px target; PNG (RGB and grey) and JPEG.
SIZES = [(13, 29), (40, 17), (9, 9), (31, 50), (16, 16), (7, 12)]


@pytest.fixture
def folder(tmp_path):
    """train/{a,b}/ and test/{a,b}/ of smooth random images (noise plus a gradient, so resizing
    matters) in the sizes above."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate("ab"):
            (tmp_path / split / name).mkdir(parents=True)
            for i, (h, w) in enumerate(SIZES):
                ramp = np.linspace(0, 120, w)[None, :, None] + np.linspace(0, 80, h)[:, None, None]
                pixels = np.clip(ramp + 50 * label + rng.integers(0, 50, (h, w, 3)), 0, 255).astype(np.uint8)
                path = tmp_path / split / name / f"{i}.{'jpg' if i % 3 == 1 else 'png'}"
                image = Image.fromarray(pixels[..., 0]) if i == 2 else Image.fromarray(pixels)  # one grey file
                image.save(path, format="JPEG" if i % 3 == 1 else "PNG", quality=90)
    return tmp_path


def _context(host, hosts):
    return tf.distribute.InputContext(num_input_pipelines=hosts, input_pipeline_id=host, num_replicas_in_sync=hosts)


def _split_files(root, split):
    """The image files of a folder split in the source's order (classes, then sorted paths)."""
    return [str(path) for name in "ab" for path in sorted((root / split / name).iterdir())]


def _tf_eval(source, host=0, hosts=1, **kwargs):
    context = _context(host, hosts) if hosts > 1 else None
    return list(data.eval_pipeline(source, input_context=context, **kwargs).as_numpy_iterator())


def _stack(batches, item=0):
    return np.concatenate([batch[item] for batch in batches])


def _keys(images):
    return [image.tobytes() for image in images]


def _small_digits(count=30):
    return data.digits_source("train").subset(np.arange(count))


def _take(stream, count):
    return [next(stream) for _ in range(count)]


# --- evaluation: the tf.data pipeline's batches ---------------------------------------------------


@pytest.mark.parametrize("eval_resize", ["crop", "resize"])
@pytest.mark.parametrize("spec", ["digits", "folder"])
def test_eval_batches_equal_the_tf_pipeline(spec, eval_resize, folder):
    source = data.load_source("digits" if spec == "digits" else f"folder:{folder}", "test")
    batch = 64 if spec == "digits" else 4
    args = dict(image_size=16, batch_size=batch, eval_resize=eval_resize, crop_ratio=0.875)
    files = np.array(_split_files(folder, "test") if spec == "folder" else [""] * source.num_examples)
    jpeg = np.char.endswith(files, ".jpg")
    ours, theirs = list(arrays.eval_batches(source, **args)), _tf_eval(source, **args)
    assert len(ours) == len(theirs) and [len(b[1]) for b in ours] == [len(b[1]) for b in theirs]
    assert all(b[0].dtype == np.float32 and b[1].dtype == np.int64 for b in ours)
    np.testing.assert_array_equal(_stack(ours, 1), _stack(theirs, 1))
    images, tf_images = _stack(ours), _stack(theirs)
    # Decoded pixels alike (the digits; PNG), the same float32 arithmetic in the same order as TF's
    # bilinear kernel: equal to the bit here (1e-3 leaves room for a TF build fusing multiply-adds).
    np.testing.assert_allclose(images[~jpeg], tf_images[~jpeg], atol=1e-3, rtol=0)
    if jpeg.any():
        # JPEG: TF's decode_image uses libjpeg's fast integer DCT (JDCT_IFAST), Pillow the accurate
        # one (JDCT_ISLOW): a few levels apart on these noisy pictures. Given TF's decoded pixels,
        # the reader's resize gives TF's images to the bit, so the decoder is the whole difference.
        difference = np.abs(images[jpeg] - tf_images[jpeg])
        assert difference.mean() < 2 and difference.max() < 16
        for path, expected in zip(files[jpeg], tf_images[jpeg]):
            decoded = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False).numpy()
            view = arrays.eval_image(decoded, (16, 16), EvalPreprocessing(eval_resize, 0.875))
            np.testing.assert_allclose(view, expected, atol=1e-3, rtol=0)
    # Two hosts, padded to the same number of full steps: labels and masks as tf.data's, and the
    # images of every real PNG or digit and of every padding row.
    steps = -(-source.num_examples // batch)  # enough for either host's half
    for host in (0, 1):
        padded = dict(args, pad_to_steps=steps)
        ours = list(arrays.eval_batches(source, host=host, hosts=2, one_hot=True, **padded))
        theirs = _tf_eval(source, host=host, hosts=2, one_hot=True, **padded)
        assert len(ours) == len(theirs) == steps and all(len(b[0]) == batch // 2 for b in ours)
        for item in (1, 2):
            np.testing.assert_array_equal(_stack(ours, item), _stack(theirs, item))
        exact = np.ones(steps * batch // 2, bool)
        exact[: len(jpeg[host::2])] = ~jpeg[host::2]
        np.testing.assert_allclose(_stack(ours)[exact], _stack(theirs)[exact], atol=1e-3, rtol=0)
        assert _stack(ours, 2).sum() == len(range(host, source.num_examples, 2))


@pytest.mark.parametrize("shape, size", [((13, 29), (7, 11)), ((5, 9), (31, 20)), ((300, 280), (224, 224))])
def test_bicubic_resize_equals_tf_image_resize(shape, size):
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = np.clip(tf.image.resize(image, size, method="bicubic", antialias=False).numpy(), 0, 255)
    np.testing.assert_allclose(arrays.resize_bicubic(image, size), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    "shape, size",
    [((8, 8), (16, 16)), ((13, 29), (7, 11)), ((40, 17), (16, 24)), ((5, 9), (31, 20)), ((100, 37), (56, 56))],
)
def test_bilinear_resize_equals_tf_image_resize(shape, size):
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = tf.image.resize(image, size, method="bilinear", antialias=False).numpy()
    resized = arrays.resize_bilinear(image, size)
    assert resized.dtype == np.float32 and resized.shape == (*size, 3)
    np.testing.assert_allclose(resized, expected, atol=1e-3, rtol=0)
    # A window of the resized image is that part of it (the centre crop computes only its pixels).
    window = arrays.resize_bilinear(image, size, window=(1, 2, size[0] - 2, size[1] - 3))
    np.testing.assert_array_equal(window, resized[1 : size[0] - 1, 2 : size[1] - 1])


def test_views_made_in_chunks_are_the_single_resizes(monkeypatch):
    # The batches interpolate their views a chunk at a time; a chunk of 3 views splits 8 of them.
    monkeypatch.setattr(arrays, "_CHUNK_BYTES", 3 * 16 * 10 * 12 * 3)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (5 + i, 13 - i, 3), dtype=np.uint8) for i in range(8)]
    out = np.full((8, 10, 12, 3), -1, np.float32)
    views = arrays._Views(out)
    assert views.chunk == 3
    for image in images[:4]:
        views.add(image, (10, 12))
    for image in images[4:]:
        views.add(image, (14, 15), window=(2, 1, 10, 12))
    views.flush()
    for i, image in enumerate(images):
        size, window = ((10, 12), None) if i < 4 else ((14, 15), (2, 1, 10, 12))
        np.testing.assert_array_equal(out[i], arrays.resize_bilinear(image, size, window))


# --- hosts ----------------------------------------------------------------------------------------


def test_host_shards_are_tf_data_shards_and_cover_each_example_once_per_epoch(folder):
    for source in (_small_digits(30), data.load_source(f"folder:{folder}", "train")):
        count = source.num_examples
        files = _split_files(folder, "train") if source.name.startswith("folder") else [""] * count
        lossless = ~np.char.endswith(np.array(files), ".jpg")  # the JPEGs decode a little apart (above)
        whole = _keys(_stack(list(arrays.eval_batches(source, image_size=16, batch_size=8, eval_resize="resize"))))
        assert len(set(whole)) == count  # distinct images: an image names its example
        seen = []
        for host in (0, 1):
            args = dict(image_size=16, batch_size=8, eval_resize="resize")
            shard = _stack(list(arrays.eval_batches(source, host=host, hosts=2, **args)))
            theirs = _tf_eval(source, host=host, hosts=2, **args)
            np.testing.assert_array_equal(
                _stack(list(arrays.eval_batches(source, host=host, hosts=2, **args)), 1), _stack(theirs, 1)
            )
            np.testing.assert_allclose(shard[lossless[host::2]], _stack(theirs)[lossless[host::2]], atol=1e-3)
            assert _keys(shard) == whole[host::2]  # examples host, host + 2, ...
            # Training, uncropped and unflipped: the first epoch of the stream is this shard once.
            stream = arrays.train_batches(
                source, image_size=16, batch_size=8, seed=1, host=host, hosts=2, area_range=(1, 1), flip=False
            )
            visits = _keys(_stack(_take(stream, -(-2 * count // 8) + 1)))
            epoch = len(shard)
            assert sorted(visits[:epoch]) == sorted(_keys(shard))
            assert sorted(visits[epoch : 2 * epoch]) == sorted(_keys(shard)) and visits[:epoch] != visits[epoch:]
            seen += visits[:epoch]
        assert sorted(seen) == sorted(whole)


# --- training -------------------------------------------------------------------------------------


def test_training_streams_repeat_resume_and_stay_in_range():
    source = _small_digits(40)
    args = dict(image_size=16, batch_size=8, area_range=(0.05, 1.0))
    first = _take(arrays.train_batches(source, seed=3, **args), 8)
    again = _take(arrays.train_batches(source, seed=3, **args), 8)
    other = _take(arrays.train_batches(source, seed=4, **args), 8)
    for (images, labels), (same_images, same_labels) in zip(first, again):
        np.testing.assert_array_equal(images, same_images)
        np.testing.assert_array_equal(labels, same_labels)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, other))
    # Resuming at step 3 gives steps 3.. of the uninterrupted stream; 8 batches of 8 cross epochs.
    resumed = _take(arrays.train_batches(source, seed=3, skip_steps=3, **args), 5)
    for (images, labels), (expected, expected_labels) in zip(resumed, first[3:]):
        np.testing.assert_array_equal(images, expected)
        np.testing.assert_array_equal(labels, expected_labels)
    for images, labels in first:
        assert images.shape == (8, 16, 16, 3) and images.dtype == np.float32
        assert images.min() >= 0 and images.max() <= 255
        assert labels.shape == (8,) and labels.dtype == np.int64
    # Two hosts share the global batch of 8: 4 examples each.
    images, labels = next(arrays.train_batches(source, seed=3, host=1, hosts=2, one_hot=True, **args))
    assert images.shape == (4, 16, 16, 3) and labels.shape == (4, 10) and labels.dtype == np.float32


def test_training_without_crop_or_flip_is_the_plain_eval_resize(folder):
    source = data.load_source(f"folder:{folder}", "train")
    plain = _stack(list(arrays.eval_batches(source, image_size=16, batch_size=4, eval_resize="resize")))
    by_image = {key: i for i, key in enumerate(_keys(plain))}
    labels = source.labels()
    stream = arrays.train_batches(source, image_size=16, batch_size=6, seed=0, area_range=(1, 1), flip=False)
    for images, batch_labels in _take(stream, 3):
        positions = [by_image[key] for key in _keys(images)]  # KeyError: not exactly an eval image
        np.testing.assert_array_equal(batch_labels, labels[positions])
    # With flips: every image is an eval image or its mirror, and both occur.
    flipped = 0
    for images, _ in _take(arrays.train_batches(source, image_size=16, batch_size=6, seed=0, area_range=(1, 1)), 3):
        for image in images:
            mirrored = image[:, ::-1].tobytes() in by_image
            assert image.tobytes() in by_image or mirrored
            flipped += mirrored and image.tobytes() not in by_image
    assert 0 < flipped < 18


def test_mixup_mixes_images_and_labels_with_one_weight_per_example():
    source = _small_digits(40)
    args = dict(image_size=16, batch_size=16, seed=5, area_range=(0.3, 1.0))
    # The mixup draws come after the crop and flip draws of a batch: without mixup, the same views.
    plain_images, plain_labels = next(arrays.train_batches(source, one_hot=True, **args))
    images, labels = next(arrays.train_batches(source, mixup=0.4, **args))
    assert labels.shape == (16, 10) and labels.dtype == np.float32
    np.testing.assert_allclose(labels.sum(axis=1), 1, atol=1e-6)
    weights = []
    for i in range(16):
        # Some partner k and weight w in [0, 1] give both the image and the label.
        fits = []
        for k in range(16):
            difference = (plain_images[i] - plain_images[k]).ravel()
            w = (
                1.0
                if not difference.any()
                else difference @ (images[i] - plain_images[k]).ravel() / (difference @ difference)
            )
            mixed = w * plain_images[i] + (1 - w) * plain_images[k]
            if -1e-6 <= w <= 1 + 1e-6 and np.allclose(mixed, images[i], atol=1e-3):
                fits.append(np.allclose(w * plain_labels[i] + (1 - w) * plain_labels[k], labels[i], atol=1e-5))
                weights.append(w)
        assert any(fits), f"row {i} is no convex combination of two views with its label's weight"
    assert np.std(weights) > 0.01  # a weight per example, not one per batch
    # mixup=0: one-hot labels, nothing mixed (as train_pipeline).
    zero_images, zero_labels = next(arrays.train_batches(source, mixup=0, **args))
    np.testing.assert_array_equal(zero_images, plain_images)
    np.testing.assert_array_equal(zero_labels, plain_labels)


# --- errors and imports ---------------------------------------------------------------------------


def _one_line_error(match, call):
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_errors_are_one_line():
    digits = _small_digits(10)
    tfds_like = Source("imagenet2012", "train", 1000, None, 100, make=lambda *args: None)
    _one_line_error(
        r"--randaugment needs TensorFlow's input pipeline .*set --randaugment 0",
        lambda: arrays.train_batches(digits, image_size=8, batch_size=4, seed=0, randaugment=15),
    )
    for make in (arrays.train_batches, arrays.eval_batches):
        kwargs = dict(seed=0) if make is arrays.train_batches else {}
        _one_line_error(
            r"imagenet2012 split 'train' is read only through TensorFlow \(tf.data / TFDS\)",
            lambda: make(tfds_like, image_size=8, batch_size=4, **kwargs),
        )
        _one_line_error(
            r"batch_size 6 is not divisible by the 4 hosts",
            lambda: make(digits, image_size=8, batch_size=6, hosts=4, **kwargs),
        )
    _one_line_error(
        r"pad_to_steps 1 of 2 examples cannot hold host 0's 5 examples",
        lambda: arrays.eval_batches(digits, image_size=8, batch_size=4, hosts=2, pad_to_steps=1),
    )
    _one_line_error(
        r"mixup alpha must be positive",
        lambda: arrays.train_batches(digits, image_size=8, batch_size=4, seed=0, mixup=-1),
    )


def test_the_reader_imports_no_tensorflow():
    script = (
        "import sys\n"
        "from keras_mixer import data\n"
        "from keras_mixer.data import arrays\n"
        "source = data.load_source('digits', 'train')\n"
        "stream = arrays.train_batches(source, image_size=16, batch_size=8, seed=0, mixup=0.2)\n"
        "images, labels = [next(stream) for _ in range(3)][-1]\n"
        "assert images.shape == (8, 16, 16, 3) and labels.shape == (8, 10)\n"
        "evaluation = list(arrays.eval_batches(data.load_source('digits', 'test'), image_size=16, batch_size=64))\n"
        "assert sum(len(labels) for _, labels in evaluation) == 360\n"
        "assert 'tensorflow' not in sys.modules, sorted(m for m in sys.modules if 'tensorflow' in m)[:5]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**ENV, **JAX}, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
