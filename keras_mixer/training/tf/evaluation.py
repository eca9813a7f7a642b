"""Top-1 / top-5 over a whole split, on every replica at once: the trainers' evaluator, also used
by `evaluate.py` for SavedModels and `.keras` files."""

import math

from keras_mixer import data
from keras_mixer.model.pixels import EvalPreprocessing


def padded_steps(source, batch_size, readers):
    """How many batches each of `readers` (workers, hosts) reads for the whole split in batches of
    batch_size / readers, every one the same number (the evaluation pads the last ones)."""
    if not source.num_examples:
        raise ValueError(f"evaluation needs the size of {source.name!r} split {source.split!r}")
    return max(1, math.ceil(math.ceil(source.num_examples / readers) / (batch_size // readers)))


def make_evaluator(strategy, predict, source, batch_size, image_size, preprocessing=None, permutation=None):
    """() -> (top-1, top-5) over the whole split, as fractions.

    Args:
        predict: images float32 [B, H, W, 3] in [0, 255] -> scores [B, classes] (logits or
            probabilities).
        source: a `data.Source` split with a known size.
        preprocessing: an `EvalPreprocessing` (default the paper's centre crop).
        permutation: None or a `data.ImagePermutation` applied to every image (section 3.4).

    Every worker runs the same number of full, padded batches; padding is masked out.
    """
    import tensorflow as tf  # here: `padded_steps` serves the JAX evaluator, without TensorFlow

    preprocessing = preprocessing or EvalPreprocessing()
    workers = strategy.extended._num_workers if hasattr(strategy.extended, "_num_workers") else 1
    steps = padded_steps(source, batch_size, workers)
    k = min(5, source.num_classes)

    def replica_eval(images, labels, mask):
        logits = tf.cast(predict(images), tf.float32)
        top1 = tf.cast(tf.math.in_top_k(labels, logits, 1), tf.float32) * mask
        topk = tf.cast(tf.math.in_top_k(labels, logits, k), tf.float32) * mask
        return tf.reduce_sum(top1), tf.reduce_sum(topk), tf.reduce_sum(mask)

    @tf.function
    def run(iterator):
        totals = tf.zeros([3])
        for _ in tf.range(steps):
            images, labels, mask = next(iterator)
            per_replica = strategy.run(replica_eval, args=(images, labels, mask))
            totals += tf.stack([strategy.reduce("SUM", v, axis=None) for v in per_replica])
        return totals

    def evaluate():
        stream = data.distribute(
            strategy,
            source,
            batch_size=batch_size,
            training=False,
            image_size=image_size,
            eval_resize=preprocessing.eval_resize,
            crop_ratio=preprocessing.crop_ratio,
            interpolation=preprocessing.interpolation,
            permutation=permutation,
            pad_to_steps=steps,
        )
        top1, top5, count = (float(v) for v in run(iter(stream)))
        return top1 / count, top5 / count

    return evaluate
