"""tf.data input pipelines: a `Source` -> batches of (images [B, H, W, 3] float32, labels).

    train: shuffle -> repeat -> Inception crop -> resize -> flip -> [RandAugment] -> [permutation]
           -> [rescale] -> batch -> [mixup] -> prefetch
    eval:  resize shorter side + centre crop (or plain resize) -> [permutation] -> [rescale] -> batch

Images stay in [0, 255] by default because the Mixer models scale inside
(`include_preprocessing=True`); `rescale=True` gives [-1, 1] for models built without it.
"""

import numpy as np
import tensorflow as tf

from keras_mixer.argument_checks import to_pair
from keras_mixer.data import transforms
from keras_mixer.model.pixels import EvalPreprocessing


def make_pipeline(source, *, training, **kwargs):
    """`train_pipeline(source, **kwargs)` when `training`, else `eval_pipeline(source, **kwargs)`."""
    return (train_pipeline if training else eval_pipeline)(source, **kwargs)


def train_pipeline(
    source,
    *,
    image_size,
    batch_size,
    input_context=None,
    seed=None,
    shuffle_buffer=10_000,
    cache=False,
    randaugment=None,
    mixup=None,
    one_hot=False,
    area_range=transforms.AREA_RANGE,
    flip=True,
    permutation=None,
    rescale=False,
    skip_steps=0,
):
    """One worker's training batches: shuffled, augmented, repeated forever.

    Args:
        source: a `keras_mixer.data.Source`.
        image_size: (H, W) or an int.
        batch_size: the global batch size; with `input_context` each replica gets its share.
        input_context: `tf.distribute.InputContext` from `distribute_datasets_from_function`:
            this worker reads only its shard.
        seed: fixes shuffling and every random transform: two pipelines with the same seed (and
            the same `input_context`) give the same batches; the hosts of one run, each reading its
            shard, draw their crops and flips apart. None: shuffling and augmentation differ each run.
        shuffle_buffer: examples in the shuffle buffer. cache: cache decoded source examples.
        randaugment: None or the paper's magnitude m (two ops). mixup: None or Beta alpha.
        one_hot: one-hot labels [B, classes] (always with mixup), else int labels [B].
        area_range: Inception crop area range. flip: random horizontal flips.
        permutation: None or an `ImagePermutation` (the paper's section 3.4), applied to every image.
        rescale: pixels to [-1, 1] (for models without built-in preprocessing).
        skip_steps: resume inside the stream: skip the examples of this many global steps
            (after shuffling, before any augmentation is computed; the random transforms of the
            remaining examples are those of an uninterrupted run).

    Returns:
        A `tf.data.Dataset` of (images float32 [B, H, W, 3], labels int64 [B] or float32 [B, classes]).
    """
    image_size, per_replica, local_replicas = _shape(source, image_size, batch_size, input_context, permutation)
    one_hot = one_hot or mixup is not None
    # Stateless transforms need an explicit seed; without one, draw it, so runs differ.
    base_seed = seed if seed is not None else int(np.random.default_rng().integers(2**31 - 1))
    randaug = transforms.randaugment_layer(randaugment, seed=seed) if randaugment else None
    finish = _finisher(source, image_size, permutation, rescale, one_hot)

    # Each host reads its own shard with the same seed: its k-th example takes the draws of visit
    # k * hosts + host, so no two hosts crop and flip alike (one host: visit k, as ever).
    hosts, host = (input_context.num_input_pipelines, input_context.input_pipeline_id) if input_context else (1, 0)

    def prepare(index, example):
        image, label = example
        visit = index * hosts + host
        crop_seed = tf.stack([tf.constant(base_seed, tf.int64), 2 * visit])
        flip_seed = tf.stack([tf.constant(base_seed, tf.int64), 2 * visit + 1])
        image = transforms.inception_crop(image, image_size, crop_seed, area_range)
        if flip:
            image = transforms.random_flip(image, flip_seed)
        image = tf.ensure_shape(image, [*image_size, 3])  # RandAugment needs the static shape
        if randaug is not None:
            image = randaug(image)
        return finish(image, label)

    dataset = source.dataset(input_context, shuffle_files=True, seed=seed)
    if cache:
        dataset = dataset.cache()
    dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    # Enumerate after repeat: every visit of an example gets its own crop and flip.
    dataset = dataset.enumerate()
    if skip_steps:
        dataset = dataset.skip(skip_steps * per_replica * local_replicas)
    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(per_replica, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
    if mixup:
        mix = transforms.mixup_layer(mixup, seed=seed)

        def mix_batch(images, labels):
            mixed = mix({"images": images, "labels": labels}, training=True)
            return mixed["images"], mixed["labels"]

        dataset = dataset.map(mix_batch, num_parallel_calls=tf.data.AUTOTUNE)
    # Training trades order for speed unless seeded.
    return _finish_stream(dataset, deterministic=seed is not None)


def eval_pipeline(
    source,
    *,
    image_size,
    batch_size,
    input_context=None,
    cache=False,
    one_hot=False,
    eval_resize="crop",
    crop_ratio=0.875,
    interpolation="bilinear",
    permutation=None,
    rescale=False,
    pad_to_steps=None,
):
    """One worker's evaluation batches: every example once, in order, the last batch partial.

    Args:
        source: a `keras_mixer.data.Source`.
        image_size: (H, W) or an int.
        batch_size: the global batch size; with `input_context` each replica gets its share.
        input_context: `tf.distribute.InputContext`: this worker reads only its shard.
        cache: cache decoded source examples.
        one_hot: one-hot labels [B, classes], else int labels [B].
        permutation: None or an `ImagePermutation`, applied to every image.
        rescale: pixels to [-1, 1] (for models without built-in preprocessing).
        eval_resize: "crop" (shorter side to size / crop_ratio, centre crop) or "resize" (whole
            image to size).
        interpolation: "bilinear" or "bicubic", the resize's.
        pad_to_steps: evaluation under a strategy: yield exactly this many global steps of full
            batches on every worker, padding with masked zero images, so replicas never run out
            at different times and shapes stay static (TPU). Adds a mask [B] (1 real, 0 padding).

    Returns:
        A `tf.data.Dataset` of (images float32 [B, H, W, 3], labels int64 [B] or float32 [B, classes]),
        plus mask float32 [B] with `pad_to_steps`.
    """
    preprocessing = EvalPreprocessing(eval_resize, crop_ratio, interpolation)
    image_size, per_replica, local_replicas = _shape(source, image_size, batch_size, input_context, permutation)
    finish = _finisher(source, image_size, permutation, rescale, one_hot)

    def prepare(image, label):
        return finish(transforms.eval_image(image, image_size, preprocessing), label)

    dataset = source.dataset(input_context, shuffle_files=False, seed=None)
    if cache:
        dataset = dataset.cache()
    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    if pad_to_steps is not None:
        dataset = _pad(dataset, pad_to_steps * per_replica * local_replicas, image_size, source.num_classes, one_hot)
    dataset = dataset.batch(per_replica, drop_remainder=False, num_parallel_calls=tf.data.AUTOTUNE)
    return _finish_stream(dataset, deterministic=True)  # evaluation keeps the source order


def _shape(source, image_size, batch_size, input_context, permutation):
    """(image size (H, W), examples per replica batch, replicas this worker feeds)."""
    image_size = to_pair("image_size", image_size)
    if permutation is not None and tuple(permutation.image_size) != image_size:
        raise ValueError(f"the permutation is for {permutation.image_size}, the pipeline makes {image_size} images")
    per_replica = input_context.get_per_replica_batch_size(batch_size) if input_context else batch_size
    # One global step takes one per-replica batch for each replica this worker feeds.
    local_replicas = input_context.num_replicas_in_sync // input_context.num_input_pipelines if input_context else 1
    return image_size, per_replica, local_replicas


def _finisher(source, image_size, permutation, rescale, one_hot):
    """What both pipelines do to a prepared image and its label, as one function."""

    def finish(image, label):
        image = tf.ensure_shape(tf.cast(image, tf.float32), [*image_size, 3])
        if permutation is not None:
            image = permutation(image)
        if rescale:
            image = transforms.rescale_to_unit_range(image)
        if one_hot:
            label = tf.one_hot(label, source.num_classes, dtype=tf.float32)
        return image, label

    return finish


def _finish_stream(dataset, deterministic):
    options = tf.data.Options()
    options.deterministic = deterministic
    # Each worker already reads its own shard (input_context) or the strategy auto-shards by data.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def _pad(dataset, count, image_size, num_classes, one_hot):
    """Exactly `count` examples: the real ones with mask 1, then zero images with mask 0."""
    real = dataset.map(lambda image, label: (image, label, tf.constant(1.0)))
    label = tf.zeros([num_classes], tf.float32) if one_hot else tf.constant(0, tf.int64)
    filler = tf.data.Dataset.from_tensors((tf.zeros([*image_size, 3], tf.float32), label, tf.constant(0.0)))
    return real.concatenate(filler.repeat()).take(count)


def distribute(strategy, source, *, batch_size, **kwargs):
    """The pipeline under a `tf.distribute` strategy: one per worker, each replica gets
    batch_size / num_replicas examples. Keyword arguments as `make_pipeline` (`training` and those
    of `train_pipeline` or `eval_pipeline`)."""
    return strategy.distribute_datasets_from_function(
        lambda context: make_pipeline(source, batch_size=batch_size, input_context=context, **kwargs)
    )
