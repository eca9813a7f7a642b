"""`train`: a run on the Keras backend this process runs, handed to `loop` (TensorFlow's
tf.distribute) or `jax_loop` (Keras' JAX backend), which both build on `run`."""

import keras

from keras_mixer.training.config import TrainConfig


def train(config: TrainConfig, strategy=None, restart=False, accept_changes=()):
    """Trains as `config` says, on the Keras backend this process runs, and returns the final
    metrics (also in WORKDIR/metrics.json).

    Args:
        strategy: TensorFlow only: an existing tf.distribute strategy, else one is made from
            `config.strategy`. On JAX the run is data-parallel over every device of every host.
        restart: start again from step 0 even though the workdir holds a run; its files are moved
            to WORKDIR/previous/<time>/ first (nothing is deleted).
        accept_changes: recipe fields allowed to differ from the run's recorded recipe on resume
            (or "all"); the changes are recorded in run.json.

    A workdir has one owner (WORKDIR/lock). A workdir with checkpoints resumes from the newest one
    that restores, after checking the recipe; one whose run already finished is left as it is.
    """
    config.validate()
    backend = keras.backend.backend()
    if backend == "jax":
        if strategy is not None:
            raise ValueError("a tf.distribute strategy was passed to train() on Keras' JAX backend, which has none")
        from keras_mixer.training.jax.engine import train_jax

        return train_jax(config, restart, accept_changes)
    if backend != "tensorflow":  # checked before anything is written
        raise ValueError(
            f"the trainers run on Keras' tensorflow and jax backends, and this process has KERAS_BACKEND={backend}"
        )
    from keras_mixer.training.tf.engine import train_tf  # imports TensorFlow

    return train_tf(config, strategy, restart, accept_changes)
