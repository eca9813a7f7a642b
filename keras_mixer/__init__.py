"""keras_mixer: MLP-Mixer (Tolstikhin et al. 2021) for Keras 3.

    import keras_mixer
    model = keras_mixer.MixerB16(classes=10)            # images in [0, 255], [B, 224, 224, 3]
    features = keras_mixer.token_feature_model(model)   # every block's [B, S, C] tokens
"""

from keras_mixer.checkpoints import CheckpointError
from keras_mixer.layers import DropPath, MixerBlock, MlpBlock, PatchStem
from keras_mixer.models import (
    VARIANTS,
    MixerB16,
    MixerB32,
    MixerH14,
    MixerL16,
    MixerL32,
    MixerS8,
    MixerS16,
    MixerS32,
    MlpMixer,
    create_model,
    drop_path_schedule,
    preprocess_input,
    token_feature_model,
)
from keras_mixer.presets import PRESETS
from keras_mixer.resolution import expand_resolution
from keras_mixer.weights import load_weights, save_npz, save_timm

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "VARIANTS",
    "CheckpointError",
    "DropPath",
    "MixerB16",
    "MixerB32",
    "MixerBlock",
    "MixerH14",
    "MixerL16",
    "MixerL32",
    "MixerS8",
    "MixerS16",
    "MixerS32",
    "MlpBlock",
    "MlpMixer",
    "PatchStem",
    "create_model",
    "load_weights",
    "drop_path_schedule",
    "expand_resolution",
    "preprocess_input",
    "save_npz",
    "save_timm",
    "token_feature_model",
]
