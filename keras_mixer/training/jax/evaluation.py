"""Top-1 / top-5 over a whole split on Keras' JAX backend, on every device and host at once: the
JAX engine's evaluator, for a model whose state lives in JAX arrays (a `JaxTrainStep`'s). The
batches are the TensorFlow engine's and the counting is the shared one (`training.accuracy`)."""

import numpy as np

from keras_mixer.data.numpy_streams import eval_stream
from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.training.accuracy import fractions, hits, padded_steps


def make_jax_evaluator(model, source, batch_size, image_size, preprocessing=None, place=None):
    """(trainable, non_trainable) -> (top-1, top-5) over the whole split, as fractions.

    Args:
        model: a Keras model (JAX backend) whose outputs are scores [B, classes].
        source: a `data.Source` split with a known size.
        batch_size: the global batch; each host reads its shard of the split in batches of
            batch_size / hosts, every host the same number of them (padded and masked out).
        preprocessing: an `EvalPreprocessing` (default the paper's centre crop).
        place: `jax_step.data_parallel()`'s placement, which splits each batch over the devices;
            default None: the arrays as they are (one device).

    The arguments of the returned function are the variable values `model.stateless_call` takes
    (a `TrainState`'s `trainable` and `non_trainable`).
    """
    import jax

    preprocessing = preprocessing or EvalPreprocessing()
    hosts, host = jax.process_count(), jax.process_index()
    steps = padded_steps(source, batch_size, hosts)
    k = min(5, source.num_classes)
    place = place or (lambda batch: batch)

    @jax.jit
    def counts(trainable, non_trainable, images, labels, mask):
        return hits(model.stateless_call(trainable, non_trainable, images, training=False)[0], labels, mask, k)

    def evaluate(trainable, non_trainable):
        stream = eval_stream(
            source,
            host=host,
            hosts=hosts,
            image_size=image_size,
            batch_size=batch_size,
            **preprocessing.to_dict(),  # eval_resize, crop_ratio, interpolation
            pad_to_steps=steps,
        )
        totals = np.zeros(3)
        for images, labels, mask in stream:
            totals += np.asarray(counts(trainable, non_trainable, *place((images, labels, mask))))
        return fractions(totals)

    return evaluate
