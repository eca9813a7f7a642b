"""Where images come from: TFDS, an image folder, or the embedded digits set.

Every source gives a `Source`: metadata plus a function that makes a `tf.data.Dataset` of
(image uint8 [h, w, 3] of any size, label int64) for one input pipeline (worker). A source can also
give its labels and a subset of its examples without decoding the images it does not keep: the
few-shot probe keeps 1-25 images per class of a split that may hold a million.

The digits and image folders are also readable without TensorFlow (`Source.read`, one example at a
time, decoded by Pillow), which `data.arrays` batches on a machine with JAX only; TensorFlow is
imported when a tf.data stream or a TFDS set is asked for.
"""

import dataclasses
import importlib.util
import logging
import os
from typing import Callable, Optional

import numpy as np

log = logging.getLogger("keras_mixer")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"  # the files' first bytes
_MAGIC = (JPEG_MAGIC, PNG_MAGIC)


def tensorflow_installed():
    """Whether TensorFlow can be imported here (without importing it): the one test of the package's
    TensorFlow-free paths."""
    return importlib.util.find_spec("tensorflow") is not None


@dataclasses.dataclass
class Source:
    """One split of a data set.

    Attributes:
        name, split: what was asked for ("digits", "train").
        num_classes: label count; labels are 0 .. num_classes - 1.
        class_names: names in label order, or None when the data set has none.
        num_examples: examples in the split, or None when unknown.
        make: (input_context, shuffle_files, seed) -> Dataset of (uint8 [h, w, 3], int64 label),
            already sharded for `input_context` (a `tf.distribute.InputContext` or None).
        skipped: {reason: [paths]} of the files an image folder left out of the split.
        make_labels: () -> int64 [N] the labels in split order, read without decoding images; None
            falls back to one decoding pass over `dataset()`.
        make_subset: positions (sorted distinct int64 [n]) -> the `Source` of those examples,
            decoding none of the others; None falls back to filtering the decoded `dataset()`.
        read: position -> uint8 [h, w, 3], the example's image without TensorFlow (digits, image
            folders); None where only tf.data reads the source (TFDS).
        sides: int [N] each image's shorter side in px, where opening the split measured them (the
            digits, a verified image folder); None elsewhere (`image_side` then samples).
    """

    name: str
    split: str
    num_classes: int
    class_names: Optional[list]
    num_examples: Optional[int]
    make: Callable = dataclasses.field(repr=False)
    skipped: dict = dataclasses.field(default_factory=dict)
    make_labels: Optional[Callable] = dataclasses.field(default=None, repr=False)
    make_subset: Optional[Callable] = dataclasses.field(default=None, repr=False)
    read: Optional[Callable] = dataclasses.field(default=None, repr=False)
    sides: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)

    def dataset(self, input_context=None, shuffle_files=False, seed=None):
        return self.make(input_context, shuffle_files, seed)

    def labels(self):
        """The labels of the split in its order, int64 [N]."""
        if self.make_labels is not None:
            return self.make_labels()
        return _labels_of(self.dataset().map(_label))

    def subset(self, indices):
        """The examples at positions `indices` (ints in 0 .. N - 1, in the split's unshuffled order)
        as a `Source` of their own, in split order, each once. Its `dataset()` ignores
        `shuffle_files` (the order is the split's) and shards the kept examples by input context."""
        positions = self._positions(indices)
        if self.make_subset is not None:
            return self.make_subset(positions)
        return _filtered_source(self, positions, lambda input_context: self.dataset(), decode=None)

    def _positions(self, indices):
        positions = np.unique(np.asarray(indices, dtype=np.int64).reshape(-1))
        if not len(positions):
            raise ValueError(f"A subset of {self.name} split {self.split!r} needs at least one position")
        if positions[0] < 0 or (self.num_examples is not None and positions[-1] >= self.num_examples):
            raise ValueError(
                f"Subset positions of {self.name} split {self.split!r} must be in 0 .. {self.num_examples} - 1, got "
                f"{positions[0] if positions[0] < 0 else positions[-1]}"
            )
        return positions

    def image_side(self, sample=256):
        """The median shorter side of the split's images in px: from `sides`, else from its first
        `sample` images; None for a split without images."""
        sides = self.sides
        if sides is None:
            if self.read is not None:
                sides = [min(self.read(i).shape[:2]) for i in range(min(sample, self.num_examples or 0))]
            else:
                sides = [min(image.shape[:2]) for image, _ in self.dataset().take(sample).as_numpy_iterator()]
        return int(np.median(sides)) if len(sides) else None

    def problems(self, shown=10):
        """{reason: {"count": n, "first": [paths]}} of the files left out; {} when none."""
        return {reason: dict(count=len(paths), first=paths[:shown]) for reason, paths in self.skipped.items() if paths}

    def describe_problems(self, shown=3):
        """One line: what was left out of this split, how many and the first paths."""
        parts = [
            f"{len(paths)} {_said(reason, len(paths))} "
            f"({', '.join(paths[:shown])}{', ...' if len(paths) > shown else ''})"
            for reason, paths in self.skipped.items()
            if paths
        ]
        return f"{self.name} split {self.split!r}: left out " + "; ".join(parts) if parts else ""


def _shard(dataset, input_context):
    if input_context is None or input_context.num_input_pipelines == 1:
        return dataset
    return dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)


def _label(image, label):
    return label


def _labels_of(labels):
    """int64 [N] the elements of a Dataset of scalar labels, in order."""

    # Batched: one host transfer per 64k labels, not one per example (ImageNet has 1.28M).
    batches = labels.batch(1 << 16).as_numpy_iterator()
    return np.concatenate([np.zeros([0], np.int64), *batches]).astype(np.int64)


def _at_positions(examples, positions):
    """The elements of `examples` at `positions` (sorted distinct int64 [n]), in order."""
    import tensorflow as tf

    keep = np.zeros(positions[-1] + 1, dtype=bool)
    keep[positions] = True
    keep = tf.constant(keep)
    # take(): nothing after the last kept position is read.
    indexed = examples.take(len(keep)).enumerate()
    return indexed.filter(lambda position, example: keep[position]).map(lambda position, example: example)


def _filtered_source(source, positions, read, decode):
    """The `Source` of `source`'s examples at `positions`, picked from the stream `read(input_context)`
    (the split, in order, unsharded) before `decode` (example -> (image, label), None for none) runs."""

    def make(input_context, shuffle_files, seed):
        import tensorflow as tf

        del shuffle_files, seed  # positions are those of the split's own order
        kept = _at_positions(read(input_context), positions)
        if decode is not None:
            kept = kept.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
        return _shard(kept, input_context)

    subset = dataclasses.replace(source, num_examples=len(positions), make=make, make_labels=None, make_subset=None)
    # The labels and nested subsets of a subset come from the same picked stream, still undecoded.
    subset.make_labels = lambda: _labels_of(_at_positions(read(None), positions).map(_label))
    subset.make_subset = lambda chosen: _filtered_source(source, positions[chosen], read, decode)
    return subset


def _in_memory(name, split, images, labels, class_names):
    """A `Source` of arrays: images uint8 [N, h, w, 3], labels int64 [N]."""

    def make(input_context, shuffle_files, seed):
        import tensorflow as tf

        del shuffle_files, seed  # examples are shuffled by the pipeline
        return _shard(tf.data.Dataset.from_tensor_slices((images, labels)), input_context)

    def make_subset(positions):
        return _in_memory(name, split, images[positions], labels[positions], class_names)

    source = Source(name, split, len(class_names), list(class_names), len(labels), make)
    source.make_labels, source.make_subset, source.read = labels.copy, make_subset, images.__getitem__
    source.sides = np.full(len(labels), min(images.shape[1:3]))
    return source


# --- the embedded digits set ---------------------------------------------------------------------

DIGITS_SPLITS = ("train", "test")


def digits_source(split="train"):
    """scikit-learn's 1,797 real 8x8 handwritten digits (no download), a fixed stratified 80/20
    train/test split (1,437 / 360). Intensities 0..16 become uint8 0..255, grey becomes RGB."""
    if split not in DIGITS_SPLITS:
        raise ValueError(f"The digits data set has splits {DIGITS_SPLITS}, not {split!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.repeat(np.round(digits.images * (255.0 / 16.0)).astype("uint8")[..., None], 3, axis=-1)
    parts = train_test_split(images, digits.target, test_size=0.2, random_state=0, stratify=digits.target)
    chosen = parts[0::2] if split == "train" else parts[1::2]
    return _in_memory("digits", split, chosen[0], chosen[1].astype("int64"), [str(d) for d in range(10)])


# --- image folders -------------------------------------------------------------------------------


# How `Source.skipped`'s reasons read for one file; more than one reads as the key says.
_ONE = {
    "files_without_an_image_extension": "file without an image extension",
    "files_not_jpeg_or_png": "file not jpeg or png",
    "images_that_fail_to_decode": "image that fails to decode",
}


def _said(reason, count):
    """A `skipped` reason in words, singular for one file ("1 image that fails to decode")."""
    return _ONE.get(reason, reason.replace("_", " ")) if count == 1 else reason.replace("_", " ")


def folder_splits(root):
    """The split names (subfolders) of an image-folder root."""
    if not os.path.isdir(root):
        raise ValueError(f"Image folder root {root!r} does not exist or is not a folder")
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def _is_image(path):
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return any(head.startswith(magic) for magic in _MAGIC)


def decoded_sides(paths):
    """{path: shorter side in px} of the paths among `paths` whose image decodes; the others (a
    truncated or corrupt body) are missing. One parallel decode pass (TensorFlow's decoder, which
    the tf.data stream uses; Pillow's without TensorFlow), so a broken file is known, named and
    counted before training starts, and the images' sizes are measured on the way."""
    if not len(paths):
        return {}
    if not tensorflow_installed():
        images = ((p, _pillow_decode(p)) for p in paths)
        return {p: min(image.shape[:2]) for p, image in images if image is not None}
    import tensorflow as tf

    def decode(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return path, tf.reduce_min(tf.shape(image)[:2])

    decoded = tf.data.Dataset.from_tensor_slices(np.asarray(paths))
    decoded = decoded.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors()
    return {path.decode(): int(side) for path, side in decoded.as_numpy_iterator()}


def _pillow_decode(path):
    """uint8 [h, w, 3] of the image file at `path` (grey and palette images become RGB), or None
    when it does not decode."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError):  # Pillow's errors for truncated or corrupt files
        return None


def _read_file(path):
    image = _pillow_decode(path)
    if image is None:
        raise ValueError(f"{path} no longer decodes as an image (it decoded when the folder was opened)")
    return image


def folder_source(root, split="train", class_names=None, verify=True):
    """Images in `root/<split>/<class name>/*.{jpg,jpeg,png}`; classes sorted by folder name.

    Nothing is dropped in silence: files without an image extension, files whose first bytes are
    not JPEG or PNG, and (with `verify`) images that fail to decode are left out of the split,
    listed in `Source.skipped` and logged with their count and first paths.

    Args:
        class_names: the class list to label with (e.g. the train split's for validation), default
            the split's own subfolders.
        verify: decode every image once now (one parallel pass) to find broken ones.
    """
    splits = folder_splits(root)
    if split not in splits:
        raise ValueError(f"Image folder {root!r} has no split {split!r}; splits found: {splits or 'none'}")
    split_dir = os.path.join(root, split)
    found = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    if not found:
        raise ValueError(f"Split folder {split_dir!r} has no class subfolders (expected {split_dir}/<class>/*.jpg)")
    class_names = list(class_names) if class_names is not None else found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise ValueError(f"Split folder {split_dir!r} has classes {unknown} that are not among {class_names}")
    skipped = {"files_without_an_image_extension": [], "files_not_jpeg_or_png": [], "images_that_fail_to_decode": []}
    candidates = {}  # label -> paths that pass the extension and magic-bytes checks
    for label, name in enumerate(class_names):
        class_dir = os.path.join(split_dir, name)
        if not os.path.isdir(class_dir):
            continue
        files = sorted(os.path.join(class_dir, f) for f in os.listdir(class_dir) if not f.startswith("."))
        for path in files:
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                skipped["files_without_an_image_extension"].append(path)
            elif not _is_image(path):
                skipped["files_not_jpeg_or_png"].append(path)
            else:
                candidates.setdefault(label, []).append(path)
    everything = [p for group in candidates.values() for p in group]
    sides = decoded_sides(everything) if verify else None
    broken = set(everything) - set(sides) if verify else set()
    skipped["images_that_fail_to_decode"] = sorted(broken)
    paths, labels = [], []
    for label, name in enumerate(class_names):
        good = [p for p in candidates.get(label, []) if p not in broken]
        if not good and os.path.isdir(os.path.join(split_dir, name)):
            raise ValueError(
                f"Class folder {os.path.join(split_dir, name)!r} has no readable .jpg/.jpeg/.png images: every "
                f"class folder needs at least one"
            )
        paths += good
        labels += [label] * len(good)
    source = _files(f"folder:{root}", split, class_names, np.array(paths), np.array(labels, dtype="int64"), skipped)
    if sides is not None:
        source.sides = np.array([sides[p] for p in paths], dtype="int64")
    if source.problems():
        log.warning("%s", source.describe_problems())
    return source


def _files(name, split, class_names, paths, labels, skipped):
    """A `Source` of image files: paths str [N], labels int64 [N]. The labels and subsets come from
    the file list: no file is read for them."""

    def make(input_context, shuffle_files, seed):
        import tensorflow as tf

        files = _shard(tf.data.Dataset.from_tensor_slices((paths, labels)), input_context)
        if shuffle_files:  # the whole file list: cheap, and a full shuffle of the examples
            files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
        images = files.map(_decode_file, num_parallel_calls=tf.data.AUTOTUNE)
        # Verified when the folder was opened; a file changed since then is dropped with
        # TensorFlow's warning.
        return images.ignore_errors(log_warning=True)

    def make_subset(positions):
        return _files(name, split, class_names, paths[positions], labels[positions], skipped)

    source = Source(name, split, len(class_names), class_names, len(paths), make, skipped)
    source.make_labels, source.make_subset = labels.copy, make_subset
    source.read = lambda position: _read_file(paths[position])
    return source


def _decode_file(path, label):
    import tensorflow as tf

    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image, label


# --- TensorFlow Datasets -------------------------------------------------------------------------


def _prepare_hint(name, data_dir):
    target = data_dir or "~/tensorflow_datasets"
    if name.startswith("imagenet2012"):
        return (
            f"ImageNet needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
            f"in {target}/downloads/manual/, then run `tfds build {name} --data_dir {target}`"
        )
    return f"prepare it with `tfds build {name} --data_dir {target}`, or pass download=True (--download)"


def tfds_source(name, split="train", data_dir=None, download=False):
    """A TensorFlow Datasets image classification set (`as_supervised`): images and labels.

    Args:
        download: download and prepare the data set if needed; False (the default) only reads
            what is already prepared under `data_dir` and says how to prepare it otherwise.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown TFDS data set {name!r}; see `tfds.list_builders()` (e.g. imagenet2012, cifar10, "
            f"oxford_iiit_pet), or use 'digits' or 'folder:PATH'"
        ) from None
    if download:
        builder.download_and_prepare()
    label = builder.info.features["label"] if "label" in builder.info.features else None
    if label is None or not hasattr(label, "num_classes"):
        raise ValueError(f"TFDS data set {name!r} has no class label feature; an image classification set is needed")
    splits = builder.info.splits
    num_examples = splits[split].num_examples if splits and split in splits else None
    read = _tfds_reader(builder, name, split, data_dir)

    def make(input_context, shuffle_files, seed):
        import tensorflow as tf

        examples = read(input_context, shuffle_files, seed, as_supervised=True)
        return examples.map(_to_rgb, num_parallel_calls=tf.data.AUTOTUNE)

    make(None, False, None)  # fails now, not at the first training step, when the data are missing
    names = list(label.names) if getattr(label, "names", None) else None
    source = Source(name, split, int(label.num_classes), names, num_examples, make)
    source.make_labels = lambda: _tfds_labels(read)
    source.make_subset = lambda positions: _tfds_subset(source, builder, read, positions)
    return source


def _tfds_reader(builder, name, split, data_dir):
    """(input_context, shuffle_files, seed, **as_dataset arguments) -> the split's Dataset, with the
    data missing or the split unknown said as one-line ValueErrors."""
    import tensorflow_datasets as tfds

    def read(input_context=None, shuffle_files=False, seed=None, **kwargs):
        import tensorflow as tf

        read_config = tfds.ReadConfig(input_context=input_context, shuffle_seed=seed)
        try:
            return builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config, **kwargs)
        except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as e:
            raise ValueError(
                f"TFDS data set {name!r} is not prepared in {builder.data_dir!r} ({e}); "
                + _prepare_hint(name, data_dir)
            ) from None
        except ValueError as e:
            raise ValueError(f"TFDS data set {name!r}: split {split!r} is not available ({e})") from None

    return read


def _tfds_labels(read):
    """int64 [N] the split's labels in order: only the label feature of each record is parsed."""
    import tensorflow_datasets as tfds

    # Under `tfds.testing.mock_data` this selection draws other random labels than the whole
    # examples (the fake generator's random stream depends on the features asked for); real
    # records give the same labels either way.
    labels = read(decoders=tfds.decode.PartialDecoding({"label": True}))
    return _labels_of(labels.map(lambda example: example["label"]))


def _tfds_subset(source, builder, read, positions):
    """`source`'s examples at `positions`: the records are read with the images still encoded, and
    only the kept ones are decoded, by the image feature's own decoder (as `as_dataset` would)."""
    import tensorflow_datasets as tfds

    image_key = builder.info.supervised_keys[0]
    image_feature = builder.info.features[image_key]

    def records(input_context):
        del input_context  # positions are those of the whole split: shard after picking
        return read(as_supervised=True, decoders={image_key: tfds.decode.SkipDecoding()})

    def decode(encoded, label):
        return _to_rgb(image_feature.decode_example(encoded), label)

    return _filtered_source(source, positions, records, decode)


def _to_rgb(image, label):
    import tensorflow as tf

    if image.shape.rank == 3 and image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return image, tf.cast(label, tf.int64)


# --- one entry point ------------------------------------------------------------------------------


def load_source(spec, split="train", data_dir=None, download=False, class_names=None):
    """`spec` is "digits", "folder:PATH" or a TFDS name; returns the split as a `Source`."""
    if spec == "digits":
        return digits_source(split)
    if spec.startswith("folder:"):
        return folder_source(spec[len("folder:") :], split, class_names=class_names)
    return tfds_source(spec, split, data_dir=data_dir, download=download)


def eval_split(spec, data_dir=None):
    """The evaluation split of a data set: "validation" when it exists, else "test"."""
    if spec == "digits":
        return "test"
    if spec.startswith("folder:"):
        splits = folder_splits(spec[len("folder:") :])
        return "validation" if "validation" in splits else "test"
    import tensorflow_datasets as tfds

    splits = tfds.builder(spec, data_dir=data_dir).info.splits
    return "validation" if splits and "validation" in splits else "test"
