"""The paper's variants as keras.applications-style constructors: `MixerB16(weights=...)`.

Each returns a `keras_mixer.MlpMixer`; `weights` may be a preset ("imagenet1k", "imagenet21k",
"sam", "gsam", or a full name from `keras_mixer.list_presets()`) or a weights file, loaded by
`keras_mixer.weights_io.loader`.
"""

from keras_mixer.model.mixer import VARIANTS, MlpMixer, variant_name
from keras_mixer.weights_io import loader


def _constructor(variant, func_name):
    default_name = variant_name(variant)

    def constructor(
        include_top=True,
        weights=None,
        input_tensor=None,
        input_shape=None,
        pooling=None,
        classes=None,
        classifier_activation="softmax",
        name=default_name,
        **kwargs,
    ):
        return loader.create(
            MlpMixer,
            variant,
            weights,
            include_top=include_top,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            name=name,
            **kwargs,
        )

    numbers = VARIANTS[variant]
    constructor.__name__ = constructor.__qualname__ = func_name
    constructor.__doc__ = (
        f"Mixer-{variant}: patch {numbers['patch_size']}, C={numbers['hidden_dim']}, {numbers['num_blocks']} blocks, "
        f"D_S={numbers['tokens_mlp_dim']}, D_C={numbers['channels_mlp_dim']}.\n\n"
        f"keras.applications arguments; `weights` is None, a preset or a weights file, `classes` defaults to the "
        f"weights' class count (else 1000), and an `input_shape` that is a multiple of the weights' size expands "
        f"the resolution. Other `MlpMixer` arguments (`include_preprocessing`, `dropout_rate`, `drop_path_rate`, "
        f"`gelu`, `recompute`, `seed`) as keywords. Returns a `keras_mixer.MlpMixer`."
    )
    return constructor


MixerS32 = _constructor("S/32", "MixerS32")
MixerS16 = _constructor("S/16", "MixerS16")
MixerS8 = _constructor("S/8", "MixerS8")
MixerB32 = _constructor("B/32", "MixerB32")
MixerB16 = _constructor("B/16", "MixerB16")
MixerL32 = _constructor("L/32", "MixerL32")
MixerL16 = _constructor("L/16", "MixerL16")
MixerH14 = _constructor("H/14", "MixerH14")


def create_model(variant, weights=None, **kwargs):
    """Builds a named variant ("B/16", ..., or a small "T/2", "T/4", "T/16") with `MlpMixer` keyword
    arguments, optionally with `weights` (a preset or a weights file)."""
    return loader.create(MlpMixer, variant, weights, **kwargs)
