"""One host's batches as NumPy arrays, for Keras' JAX backend: from tf.data where TensorFlow is
installed (the TF trainer's exact streams, TFDS included), else from `arrays` (NumPy and Pillow:
the digits and image folders).

Either way host h of H reads its shard of every global batch, batch_size / H examples, as
`tf.distribute.InputContext(H, h, H)` shards on TensorFlow.
"""

from keras_mixer.data.sources import tensorflow_installed


def _context(host, hosts):
    import tensorflow as tf

    return tf.distribute.InputContext(num_input_pipelines=hosts, input_pipeline_id=host, num_replicas_in_sync=hosts)


def train_stream(source, *, host=0, hosts=1, cache=False, **kwargs):
    """This host's training batches (images float32 [B / H, h, w, 3], labels), forever.

    `kwargs`: `data.train_pipeline`'s (batch_size, image_size, seed, skip_steps, augmentation);
    `cache` applies to tf.data only (the arrays reader keeps nothing but the digits in memory)."""
    if tensorflow_installed():
        from keras_mixer.data.pipeline import train_pipeline

        stream = train_pipeline(source, input_context=_context(host, hosts), cache=cache, **kwargs)
        return stream.as_numpy_iterator()
    from keras_mixer.data import arrays

    return arrays.train_batches(source, host=host, hosts=hosts, **kwargs)


def eval_stream(source, *, host=0, hosts=1, **kwargs):
    """This host's evaluation batches (images, labels[, mask with `pad_to_steps`]), every example
    of its shard once, in order. `kwargs`: `data.eval_pipeline`'s (batch_size, image_size,
    eval_resize, crop_ratio, pad_to_steps)."""
    if tensorflow_installed():
        from keras_mixer.data.pipeline import eval_pipeline

        return eval_pipeline(source, input_context=_context(host, hosts), **kwargs).as_numpy_iterator()
    from keras_mixer.data import arrays

    return arrays.eval_batches(source, host=host, hosts=hosts, **kwargs)
