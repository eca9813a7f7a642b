"""Training: recipes (`TrainConfig`), schedules, strategy resolution and the loops.

Names are imported on first use, so `import keras_mixer.training` (or `training.config`) loads
neither TensorFlow nor JAX; `train` runs `loop` (TensorFlow) or `jax_loop` (JAX), as the process's
Keras backend is.
"""

import importlib

_WHERE = {
    "TrainConfig": "config",
    "load_config": "config",
    "train": "loop",
    "TrainingDiverged": "stops",
    "WarmupDecay": "schedules",
    "clip_by_global_norm": "tf.step",
    "make_optimizer": "optimizer",
    "choose_strategy": "tf.strategy",
    "make_strategy": "tf.strategy",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
