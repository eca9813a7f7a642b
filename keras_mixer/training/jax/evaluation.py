"""Top-1 / top-5 over a whole split on Keras' JAX backend, on every device and host at once.

The counterpart of `evaluation.make_evaluator` for a model whose state lives in JAX arrays (a
`JaxTrainStep`'s): the same tf.data evaluation batches and the same counting, so a model scores
the same on either backend.
"""

import numpy as np

from keras_mixer.data.numpy_streams import eval_stream
from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.training.tf.evaluation import padded_steps


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
    (a `TrainState`'s `trainable` and `non_trainable`). A label is in the top k when fewer than k
    classes score above it, so ties count as `tf.math.in_top_k` counts them.
    """
    import jax
    import jax.numpy as jnp

    preprocessing = preprocessing or EvalPreprocessing()
    hosts, host = jax.process_count(), jax.process_index()
    steps = padded_steps(source, batch_size, hosts)
    k = min(5, source.num_classes)
    place = place or (lambda batch: batch)

    @jax.jit
    def counts(trainable, non_trainable, images, labels, mask):
        scores = model.stateless_call(trainable, non_trainable, images, training=False)[0].astype(jnp.float32)
        label_scores = jnp.take_along_axis(scores, labels[:, None].astype(jnp.int32), axis=1)
        above = jnp.sum(scores > label_scores, axis=1)  # classes scoring above the label
        return jnp.stack([jnp.sum((above < 1) * mask), jnp.sum((above < k) * mask), jnp.sum(mask)])

    def evaluate(trainable, non_trainable):
        stream = eval_stream(
            source,
            host=host,
            hosts=hosts,
            image_size=image_size,
            batch_size=batch_size,
            eval_resize=preprocessing.eval_resize,
            crop_ratio=preprocessing.crop_ratio,
            interpolation=preprocessing.interpolation,
            pad_to_steps=steps,
        )
        totals = np.zeros(3)
        for images, labels, mask in stream:
            totals += np.asarray(counts(trainable, non_trainable, *place((images, labels, mask))))
        return totals[0] / totals[2], totals[1] / totals[2]

    return evaluate
