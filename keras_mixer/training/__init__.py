"""Training: recipes (`TrainConfig`), schedules, strategy resolution and the distributed loop."""

from keras_mixer.training.config import TrainConfig, load_config
from keras_mixer.training.loop import TrainingDiverged, train
from keras_mixer.training.schedules import WarmupDecay
from keras_mixer.training.step import clip_by_global_norm, make_optimizer
from keras_mixer.training.strategy import choose_strategy, make_strategy

__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "WarmupDecay",
    "choose_strategy",
    "clip_by_global_norm",
    "load_config",
    "make_optimizer",
    "make_strategy",
    "train",
]
