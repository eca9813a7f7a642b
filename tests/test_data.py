"""Input pipelines: sources, transforms (by their statistics), permutations, sharding, bad input."""

import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from keras_mixer import data
from keras_mixer.data.sources import Source


def _all(dataset):
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
    return np.concatenate(images), np.concatenate(labels)


def _memory_source(images, labels, classes):
    def make(input_context, shuffle_files, seed):
        return tf.data.Dataset.from_tensor_slices((images, labels))

    return Source("memory", "train", classes, None, len(labels), make)


# --- sources ------------------------------------------------------------------------------------


def test_digits_source_end_to_end():
    train, test = data.digits_source("train"), data.digits_source("test")
    assert (train.num_examples, test.num_examples, train.num_classes) == (1437, 360, 10)
    images, labels = _all(data.make_pipeline(test, training=False, image_size=8, batch_size=100, eval_resize="resize"))
    assert images.shape == (360, 8, 8, 3) and sorted(set(labels)) == list(range(10))
    from sklearn.datasets import load_digits

    # The pipeline's images are the real digits, grey copied to RGB, 0..16 scaled to 0..255.
    digits = load_digits()
    originals = {d.tobytes() for d in np.round(digits.images * 255 / 16).astype("float32")}
    assert all(image[..., 0].tobytes() in originals for image in images)
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    # Eval output is deterministic.
    again, _ = _all(data.make_pipeline(test, training=False, image_size=8, batch_size=64, eval_resize="resize"))
    np.testing.assert_array_equal(images, again)
    with pytest.raises(ValueError, match=r"splits \('train', 'test'\), not 'validation'"):
        data.digits_source("validation")


def test_tfds_path_with_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        source = data.load_source("cifar10", "train")
        assert source.num_classes == 10 and len(source.class_names) == 10
        images, labels = next(iter(data.make_pipeline(source, training=True, image_size=16, batch_size=6, seed=0)))
        assert images.shape == (6, 16, 16, 3) and labels.dtype == tf.int64
        assert np.all((labels.numpy() >= 0) & (labels.numpy() < 10))
        grey = data.load_source("mnist", "test")  # 1-channel images become RGB
        images, _ = next(iter(data.make_pipeline(grey, training=False, image_size=28, batch_size=4, rescale=True)))
        assert images.shape == (4, 28, 28, 3) and images.numpy().min() >= -1 and images.numpy().max() <= 1


def test_tfds_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown TFDS data set 'no_such_set'"):
        data.load_source("no_such_set")
    with pytest.raises(ValueError, match=r"'cifar10' is not prepared.*tfds build cifar10"):
        data.load_source("cifar10", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"ILSVRC2012_img_train.tar.*downloads/manual.*tfds build imagenet2012"):
        data.load_source("imagenet2012", "validation", data_dir=str(tmp_path))


def _write(path, array, fmt):
    encoded = tf.io.encode_jpeg(array) if fmt == "jpeg" else tf.io.encode_png(array)
    tf.io.write_file(str(path), encoded)


@pytest.fixture
def image_folder(tmp_path):
    """train/{cat,dog} and validation/{cat,dog}: JPEG and PNG, RGB and grey, odd sizes, bad files."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 5), ("validation", 4)):
        for label, name in enumerate(("cat", "dog")):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                size = (17 + 5 * i, 23 + 3 * i)
                image = np.full((*size, 3), 40 + 150 * label, np.uint8) + rng.integers(
                    0, 20, (*size, 3), dtype=np.uint8
                )
                _write(folder / f"{i}.jpg", image, "jpeg") if i % 2 else _write(folder / f"{i}.png", image, "png")
    _write(tmp_path / "train" / "cat" / "grey.png", np.full((30, 20, 1), 77, np.uint8), "png")
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"this is not an image")
    _write(tmp_path / "train" / "dog" / "cut.jpg", np.zeros((64, 64, 3), np.uint8) + 200, "jpeg")
    cut = (tmp_path / "train" / "dog" / "cut.jpg").read_bytes()
    (tmp_path / "train" / "dog" / "cut.jpg").write_bytes(cut[: len(cut) // 2])  # JPEG header, truncated body
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return tmp_path


def test_image_folder_source(image_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="keras_mixer"):
        train = data.load_source(f"folder:{image_folder}", "train")
    assert train.class_names == ["cat", "dog"] and train.num_classes == 2
    # Nothing left out in silence: each file named with its reason, counted, logged.
    assert train.skipped == {
        "files_without_an_image_extension": [str(image_folder / "train" / "dog" / "notes.txt")],
        "files_not_jpeg_or_png": [str(image_folder / "train" / "cat" / "broken.jpg")],
        "images_that_fail_to_decode": [str(image_folder / "train" / "dog" / "cut.jpg")],
    }
    assert train.problems()["images_that_fail_to_decode"]["count"] == 1
    for name in ("notes.txt", "broken.jpg", "cut.jpg"):
        assert name in caplog.text
    assert train.num_examples == 11  # 5 + 5 + grey; the truncated JPEG is found before training
    images, labels = _all(data.make_pipeline(train, training=False, image_size=16, batch_size=4))
    assert images.shape == (11, 16, 16, 3)
    assert sorted(labels.tolist()) == [0] * 6 + [1] * 5
    dark, bright = images[labels == 0].mean(), images[labels == 1].mean()
    assert dark < 100 < bright  # labels follow the class folders
    assert data.eval_split(f"folder:{image_folder}") == "validation"
    validation = data.load_source(f"folder:{image_folder}", "validation", class_names=train.class_names)
    assert validation.num_examples == 8


def test_image_folder_errors(image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"root '.*nowhere' does not exist"):
        data.load_source(f"folder:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match=r"no split 'test'; splits found: \['train', 'validation'\]"):
        data.load_source(f"folder:{image_folder}", "test")
    (image_folder / "empty").mkdir()
    with pytest.raises(ValueError, match=r"'.*empty' has no class subfolders"):
        data.load_source(f"folder:{image_folder}", "empty")
    (image_folder / "train" / "owl").mkdir()
    with pytest.raises(ValueError, match=r"Class folder '.*owl' has no readable"):
        data.load_source(f"folder:{image_folder}", "train")


def _examples(source):
    """[(image uint8 [h, w, 3], label)] of the source's unshuffled split, decoded, in order."""
    return list(source.dataset().as_numpy_iterator())


def _assert_subset_is(subset, examples, positions):
    chosen = _examples(subset)
    assert [label for _, label in chosen] == [examples[p][1] for p in positions]
    for (image, _), p in zip(chosen, positions):
        np.testing.assert_array_equal(image, examples[p][0])
    np.testing.assert_array_equal(subset.labels(), [examples[p][1] for p in positions])


def test_folder_labels_and_subset_read_no_unchosen_file(image_folder):
    train = data.load_source(f"folder:{image_folder}", "train")
    examples = _examples(train)
    np.testing.assert_array_equal(train.labels(), [label for _, label in examples])
    # The first file and the last (cat/0.png, dog/4.png) are not chosen; broken after the folder
    # was opened, they would be dropped by a decoding pass and shift every later position.
    (image_folder / "train" / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (image_folder / "train" / "dog" / "4.png").write_bytes(b"garbage")
    np.testing.assert_array_equal(train.labels(), [label for _, label in examples])
    subset = train.subset([9, 1, 6, 1])
    assert subset.num_examples == 3
    _assert_subset_is(subset, examples, [1, 6, 9])
    _assert_subset_is(subset.subset([2, 0]), examples, [1, 9])  # positions of the subset
    assert len(_examples(train)) == 9  # the whole split does see the broken files
    with pytest.raises(ValueError, match=r"positions of folder:.* split 'train' must be in 0 \.\. 11 - 1, got 11"):
        train.subset([3, 11])


class KerasMixerTinyPictures(tfds.core.GeneratorBasedBuilder):
    """A real (not mocked) TFDS image set of 10 grey PNGs of various sizes, prepared in seconds."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(None, None, 1)),
            "label": tfds.features.ClassLabel(num_classes=3),
        }
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), supervised_keys=("image", "label")
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(10):
            yield i, {"image": rng.integers(0, 255, (5 + i, 7, 1), dtype=np.uint8), "label": i % 3}


def _count_image_decodes(monkeypatch):
    """Counts, from now on, the images TFDS's Image feature decodes (in tf.data graphs too)."""
    calls = []
    original = tfds.features.Image.decode_example

    def counted(self, example):
        image = original(self, example)
        with tf.control_dependencies([tf.py_function(lambda: calls.append(1) or 0, [], tf.int64)]):
            return tf.identity(image)

    monkeypatch.setattr(tfds.features.Image, "decode_example", counted)
    return calls


def test_tfds_labels_and_subset_decode_only_the_chosen_images(tmp_path, monkeypatch):
    source = data.tfds_source("keras_mixer_tiny_pictures", "train", data_dir=str(tmp_path), download=True)
    examples = _examples(source)
    assert len(examples) == 10 and all(image.shape[-1] == 3 for image, _ in examples)  # grey becomes RGB
    decodes = _count_image_decodes(monkeypatch)
    np.testing.assert_array_equal(source.labels(), [label for _, label in examples])  # in TFDS's order
    assert not decodes
    subset = source.subset([8, 3, 5])
    _assert_subset_is(subset, examples, [3, 5, 8])
    assert len(decodes) == 3  # read once by _assert_subset_is; its labels() decode nothing
    _assert_subset_is(subset.subset([2]), examples, [8])


def test_tfds_subset_under_mock_data_decodes_only_the_chosen_images(monkeypatch):
    with tfds.testing.mock_data(num_examples=12):
        source = data.load_source("mnist", "test")  # grey: the subset makes RGB too
        examples = _examples(source)
        decodes = _count_image_decodes(monkeypatch)
        _assert_subset_is(source.subset([11, 0, 4]), examples, [0, 4, 11])
        assert len(decodes) == 3
        assert examples[0][0].shape == (28, 28, 3)


# --- transforms, by their statistics ------------------------------------------------------------


def test_flips_happen_about_half_the_time():
    image = np.zeros((400, 8, 8, 3), np.uint8)
    image[:, :, 4:] = 255  # dark left half, bright right half
    source = _memory_source(image, np.zeros(400, np.int64), 2)
    batches = data.make_pipeline(source, training=True, image_size=8, batch_size=400, seed=3, area_range=(1.0, 1.0))
    images, _ = next(iter(batches))
    flipped = images.numpy()[:, 0, 0, 0] > 127
    sigma = np.sqrt(0.25 / 400)
    assert abs(flipped.mean() - 0.5) < 4 * sigma


def test_mixup_labels_are_mixed_and_sum_to_one():
    source = data.digits_source("train")
    _, labels = next(iter(data.make_pipeline(source, training=True, image_size=8, batch_size=64, seed=0, mixup=0.5)))
    labels = labels.numpy()
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
    assert ((labels > 0.01) & (labels < 0.99)).any()  # some examples really are mixtures
    assert labels.min() >= 0


def test_paper_augmentation_under_a_mixed_precision_policy_stays_float32():
    """The paper recipes train in mixed_bfloat16 with RandAugment and mixup: the pipeline's layers must
    not take the global policy (they would multiply bfloat16 by float32 and fail)."""
    import keras

    keras.config.set_dtype_policy("mixed_bfloat16")  # reset by conftest
    source = data.digits_source("train")
    stream = data.make_pipeline(source, training=True, image_size=8, batch_size=16, seed=0, randaugment=15, mixup=0.5)
    images, labels = next(iter(stream))
    assert images.dtype == tf.float32 and labels.dtype == tf.float32
    np.testing.assert_allclose(labels.numpy().sum(axis=1), 1.0, atol=1e-5)


def test_seeded_training_pipelines_repeat_and_randaugment_changes_images():
    source = data.digits_source("train")
    kwargs = dict(training=True, image_size=16, batch_size=32)
    first, _ = next(iter(data.make_pipeline(source, seed=5, **kwargs)))
    second, _ = next(iter(data.make_pipeline(source, seed=5, **kwargs)))
    other, _ = next(iter(data.make_pipeline(source, seed=6, **kwargs)))
    np.testing.assert_array_equal(first.numpy(), second.numpy())
    assert np.abs(first.numpy() - other.numpy()).max() > 0
    augmented, _ = next(iter(data.make_pipeline(source, seed=5, randaugment=20, **kwargs)))
    assert np.abs(augmented.numpy() - first.numpy()).max() > 1


# --- permutations -------------------------------------------------------------------------------


def _patches(images, patch):
    b, h, w, c = images.shape
    grid = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(b, -1, patch * patch, c)


def test_patch_permutation_keeps_patch_contents_and_inverts():
    images = np.random.default_rng(0).integers(0, 255, (2, 12, 16, 3)).astype("float32")
    permutation = data.ImagePermutation("patches", (12, 16), patch_size=4, seed=1)
    shuffled = permutation(images).numpy()
    assert not np.array_equal(shuffled, images)
    original, moved = _patches(images, 4), _patches(shuffled, 4)
    for b in range(2):  # the multiset of patches, each a multiset of pixels, is unchanged
        key = lambda p: tuple(sorted(map(tuple, p)))  # noqa: E731
        assert sorted(map(key, original[b])) == sorted(map(key, moved[b]))
    # One shared within-patch order: the same pixel permutation relates every patch to its source.
    np.testing.assert_array_equal(permutation.invert(shuffled).numpy(), images)
    same = data.ImagePermutation("patches", (12, 16), patch_size=4, seed=1)
    np.testing.assert_array_equal(same.index, permutation.index)
    assert not np.array_equal(data.ImagePermutation("patches", (12, 16), patch_size=4, seed=2).index, permutation.index)


def test_pixel_permutation_and_pipelines_share_it():
    permutation = data.ImagePermutation("pixels", 8, seed=4)
    assert sorted(permutation.index) == list(range(64)) and (permutation.index != np.arange(64)).any()
    source = data.digits_source("test")
    kwargs = dict(training=False, image_size=8, batch_size=360, eval_resize="resize")
    plain, _ = next(iter(data.make_pipeline(source, **kwargs)))
    permuted, _ = next(
        iter(data.make_pipeline(source, permutation=data.ImagePermutation("pixels", 8, seed=4), **kwargs))
    )
    np.testing.assert_array_equal(permuted.numpy(), permutation(plain).numpy())
    np.testing.assert_array_equal(permutation.invert(permuted).numpy(), plain.numpy())
    with pytest.raises(ValueError, match=r"permutation must be one of \('patches', 'pixels'\), got 'rows'"):
        data.ImagePermutation("rows", 8)
    with pytest.raises(ValueError, match=r"permutation is for \(8, 8\), the pipeline makes \(16, 16\)"):
        data.make_pipeline(source, training=False, image_size=16, batch_size=4, permutation=permutation)


# --- sharding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["digits", "folder"])
def test_worker_shards_are_disjoint_and_cover_the_data(spec, image_folder):
    name = "digits" if spec == "digits" else f"folder:{image_folder}"
    split = "test" if spec == "digits" else "validation"
    source = data.load_source(name, split)
    seen = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=2)
        batches = data.make_pipeline(source, training=False, image_size=8, batch_size=8, input_context=context)
        images, _ = _all(batches)
        assert next(iter(batches))[0].shape[0] == 4  # each replica gets half the global batch
        seen.append({image.tobytes() for image in images})
    everything, _ = _all(data.make_pipeline(source, training=False, image_size=8, batch_size=8))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {image.tobytes() for image in everything}


def test_bad_pipeline_arguments():
    source = data.digits_source("test")
    with pytest.raises(ValueError, match=r"eval_resize must be one of .* 'squash'"):
        data.make_pipeline(source, training=False, image_size=8, batch_size=4, eval_resize="squash")
    with pytest.raises(ValueError, match=r"crop_ratio must be in \(0, 1\], got 0"):
        data.make_pipeline(source, training=False, image_size=8, batch_size=4, crop_ratio=0)
    with pytest.raises(ValueError, match=r"RandAugment magnitude must be in \[0, 30\], got 45"):
        data.make_pipeline(source, training=True, image_size=8, batch_size=4, randaugment=45)
    with pytest.raises(ValueError, match=r"mixup alpha must be positive, got -1"):
        data.make_pipeline(source, training=True, image_size=8, batch_size=4, mixup=-1)
    with pytest.raises(ValueError, match=r"image_size must be a positive integer, got 0"):
        data.make_pipeline(source, training=True, image_size=0, batch_size=4)


def test_each_host_crops_and_flips_its_shard_with_its_own_draws():
    # Every example is the same picture, so two hosts' batches differ only by their random crops
    # and flips: with the same seed, host 1's k-th example must not take host 0's k-th draws.
    from keras_mixer.data.sources import _in_memory

    picture = np.random.default_rng(0).integers(0, 256, (1, 16, 16, 3)).astype("uint8")
    source = _in_memory("same", "train", np.repeat(picture, 64, axis=0), np.zeros(64, np.int64), ["a", "b"])

    def first_batch(host, hosts):
        context = tf.distribute.InputContext(
            num_input_pipelines=hosts, input_pipeline_id=host, num_replicas_in_sync=hosts
        )
        stream = data.train_pipeline(source, image_size=16, batch_size=16, input_context=context, seed=3)
        return next(iter(stream))[0].numpy()

    host0, host1 = first_batch(0, 2), first_batch(1, 2)
    assert not any(np.array_equal(a, b) for a, b in zip(host0, host1))
    # One host reads the stream it always read: host 0 of 2 takes the even draws of one host's.
    assert np.array_equal(first_batch(0, 1)[::2], host0)
