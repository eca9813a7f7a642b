"""Top-1 / top-5 counting over a whole split, written once for both engines' evaluators
(`training.tf.evaluation` on tf.distribute, `training.jax.evaluation` on Keras' JAX backend):
the same padded batches and the same count, so a model scores the same on either backend."""

import math

import keras


def padded_steps(source, batch_size, readers):
    """How many batches each of `readers` (workers, hosts) reads for the whole split in batches of
    batch_size / readers, every one the same number (the evaluation pads the last ones)."""
    if not source.num_examples:
        raise ValueError(f"evaluation needs the size of {source.name!r} split {source.split!r}")
    return max(1, math.ceil(math.ceil(source.num_examples / readers) / (batch_size // readers)))


def hits(scores, labels, mask, k):
    """float32 [3]: (top-1 hits, top-k hits, examples) of one batch, padding left out.

    Args:
        scores: [B, classes] logits or probabilities; labels: int [B]; mask: float32 [B], 1 for a
            real example and 0 for padding; k: the top-k's k (at most the class count).

    A label is in the top k when fewer than k classes score above it, so ties count in its
    favour (as `tf.math.in_top_k` counts them). Written in `keras.ops`: it runs inside a
    tf.function on TensorFlow and inside `jax.jit` on JAX.
    """
    ops = keras.ops
    scores = ops.cast(scores, "float32")
    label_scores = ops.take_along_axis(scores, ops.expand_dims(ops.cast(labels, "int32"), 1), axis=1)
    above = ops.sum(ops.cast(scores > label_scores, "float32"), axis=1)  # classes scoring above the label
    mask = ops.cast(mask, "float32")
    in_top = [ops.sum(ops.cast(above < n, "float32") * mask) for n in (1, k)]
    return ops.stack([*in_top, ops.sum(mask)])


def fractions(totals):
    """(top-1, top-5) as fractions of the examples, from summed `hits`."""
    top1, top5, count = (float(v) for v in totals)
    return top1 / count, top5 / count
