"""Training: recipes (`TrainConfig`), schedules, the one loop (`loop`) and its two engines, in the
wings `tf/` (tf.distribute) and `jax/` (Keras' JAX backend). The modules directly in this folder
import neither TensorFlow nor JAX; `train` hands the loop the engine of the process's backend.

Names are imported on first use, so `import keras_mixer.training` (or `training.config`) loads
neither TensorFlow nor JAX.
"""

import importlib

_WHERE = {
    "TrainConfig": "config",
    "load_config": "config",
    "TrainingDiverged": "stops",
    "WarmupDecay": "schedules",
    "clip_by_global_norm": "tf.step",
    "make_optimizer": "optimizer",
    "choose_strategy": "tf.strategy",
    "make_strategy": "tf.strategy",
}

__all__ = sorted([*_WHERE, "train"])


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def train(config, strategy=None, restart=False, accept_changes=()):
    """Trains as `config` (a `TrainConfig`) says, on the Keras backend this process runs, and
    returns the final metrics (also in WORKDIR/metrics.json).

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
    import keras

    from keras_mixer.training.loop import run_training

    config.validate()
    backend = keras.backend.backend()
    if backend == "jax":
        if strategy is not None:
            raise ValueError("a tf.distribute strategy was passed to train() on Keras' JAX backend, which has none")
        from keras_mixer.training.jax.engine import JaxEngine

        engine = JaxEngine()
    elif backend == "tensorflow":
        from keras_mixer.training.tf.engine import TfEngine  # imports TensorFlow

        engine = TfEngine(strategy)
    else:  # checked before anything is written
        raise ValueError(
            f"the trainers run on Keras' tensorflow and jax backends, and this process has KERAS_BACKEND={backend}"
        )
    return run_training(config, engine, restart, accept_changes)
