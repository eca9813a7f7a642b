"""Top-1 / top-5 over a whole split, on every replica at once (tf.distribute): the TensorFlow
engine's evaluator, also used by `evaluate.py` for SavedModels and `.keras` files. The counting is
the shared one (`training.accuracy`)."""

import tensorflow as tf

from keras_mixer import data
from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.training.accuracy import fractions, hits, padded_steps


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
    preprocessing = preprocessing or EvalPreprocessing()
    workers = strategy.extended._num_workers if hasattr(strategy.extended, "_num_workers") else 1
    steps = padded_steps(source, batch_size, workers)
    k = min(5, source.num_classes)

    def replica_hits(images, labels, mask):
        return hits(predict(images), labels, mask, k)

    @tf.function
    def run(iterator):
        totals = tf.zeros([3])
        for _ in tf.range(steps):
            totals += strategy.reduce("SUM", strategy.run(replica_hits, args=next(iterator)), axis=None)
        return totals

    def evaluate():
        stream = data.distribute(
            strategy,
            source,
            batch_size=batch_size,
            training=False,
            image_size=image_size,
            **preprocessing.to_dict(),  # eval_resize, crop_ratio, interpolation
            permutation=permutation,
            pad_to_steps=steps,
        )
        return fractions(run(iter(stream)))

    return evaluate
