"""keras_mixer: MLP-Mixer (Tolstikhin et al. 2021) for Keras 3.

    import keras_mixer
    model = keras_mixer.MixerB16(classes=10)                       # images in [0, 255], [B, 224, 224, 3]
    model = keras_mixer.MlpMixer.from_preset("mixer_b16_imagenet1k")
    keras_mixer.decode_predictions(model.predict(images))           # [(wnid, name, score), ...] per image
    features = keras_mixer.token_feature_model(model)               # every block's [B, S, C] tokens

Layers: `keras_mixer.layers`. The model: `keras_mixer.models`. Weights files and presets:
`keras_mixer.loader`. A device-resident training step for the JAX backend: `JaxTrainStep`.
Nothing here imports TensorFlow, so the model runs on any Keras backend.
"""

from keras_mixer.applications import (
    MixerB16,
    MixerB32,
    MixerH14,
    MixerL16,
    MixerL32,
    MixerS8,
    MixerS16,
    MixerS32,
    create_model,
)
from keras_mixer.imagenet import decode_predictions
from keras_mixer.jax_step import JaxTrainStep
from keras_mixer.layers import DropPath, MixerBlock, MlpBlock, PatchStem
from keras_mixer.loader import load_weights
from keras_mixer.models import VARIANTS, MlpMixer, drop_path_schedule, preprocess_input, token_feature_model
from keras_mixer.presets import list_presets
from keras_mixer.resolution import expand_resolution
from keras_mixer.weight_files import WeightsError
from keras_mixer.weights import save_npz, save_timm

__version__ = "0.2.0"

__all__ = [
    "VARIANTS",
    "DropPath",
    "JaxTrainStep",
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
    "WeightsError",
    "create_model",
    "decode_predictions",
    "drop_path_schedule",
    "expand_resolution",
    "list_presets",
    "load_weights",
    "preprocess_input",
    "save_npz",
    "save_timm",
    "token_feature_model",
]
