"""keras_mixer: MLP-Mixer (Tolstikhin et al. 2021) for Keras 3.

    import keras_mixer
    model = keras_mixer.MixerB16(classes=10)                       # images in [0, 255], [B, 224, 224, 3]
    model = keras_mixer.MlpMixer.from_preset("mixer_b16_imagenet1k")  # or hf://, kaggle://, a folder
    keras_mixer.decode_predictions(model.predict(images))           # [(wnid, name, score), ...] per image
    fast = keras_mixer.freeze(model, "bfloat16")                    # frozen TF graph: fastest on CPUs with AMX
    features = keras_mixer.token_feature_model(model)               # every block's [B, S, C] tokens

Layers: `keras_mixer.model.layers`. The model: `keras_mixer.model.mixer`. Weights files and presets:
`keras_mixer.weights_io.loader`. A device-resident training step for the JAX backend: `JaxTrainStep`.
Nothing here imports TensorFlow, so the model runs on any Keras backend.
"""

import importlib

# Names are imported on first use (PEP 562), so `import keras_mixer` or one of its programs starts
# without loading Keras: the programs quiet TensorFlow's start-up lines before Keras imports it.
_WHERE = {
    **dict.fromkeys(
        ["MixerB16", "MixerB32", "MixerH14", "MixerL16", "MixerL32", "MixerS8", "MixerS16", "MixerS32"],
        "model.applications",
    ),
    "create_model": "model.applications",
    "decode_predictions": "weights_io.imagenet_classes",
    "JaxTrainStep": "training.jax.step",
    **dict.fromkeys(["DropPath", "MixerBlock", "MlpBlock", "PatchStem"], "model.layers"),
    "load_weights": "weights_io.loader",
    **dict.fromkeys(
        ["VARIANTS", "MlpMixer", "drop_path_schedule", "preprocess_input", "token_feature_model"], "model.mixer"
    ),
    "list_presets": "weights_io.presets",
    "upload_preset": "weights_io.hubs",
    "expand_resolution": "model.resolution_expansion",
    "WeightsError": "weights_io.file_formats",
    **dict.fromkeys(["save_npz", "save_timm"], "weights_io.official_keys"),
}


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__():
    return sorted({*globals(), *_WHERE})


from keras_mixer.version import __version__  # noqa: E402, F401


def freeze(model, precision="float32"):
    """`model` frozen into one TF graph for inference, as the TF Serving export runs it: a
    `keras_mixer.serving.export.FrozenModel` with `predict(images)`. On a CPU with AMX or AVX512-BF16,
    `precision="bfloat16"` is the fastest way to run the model (docs/speed.md).
    Needs Keras' TensorFlow backend."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"freeze builds a TensorFlow graph, and Keras runs on {keras.backend.backend()!r}: set "
            f"KERAS_BACKEND=tensorflow (on JAX, jax.jit of model.stateless_call is the fast path)"
        )
    from keras_mixer.serving.export import freeze as frozen  # TensorFlow: imported on first use only

    return frozen(model, precision)


# A saved model names its classes by their registered Keras names: register them whenever Keras
# loads (now, or right after its import), so `keras.saving.load_model` works after this import alone.
from keras_mixer import old_paths, registration  # noqa: E402  (standard library only)

registration.register_when_keras_loads()
old_paths.install()

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
    "freeze",
    "list_presets",
    "load_weights",
    "preprocess_input",
    "save_npz",
    "save_timm",
    "token_feature_model",
    "upload_preset",
]
