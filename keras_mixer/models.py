"""The Mixer variants of the paper as Keras functional models, keras.applications style.

    image [B, H, W, 3] -> (Rescaling to [-1, 1]) -> stem [B, S, C] -> N x MixerBlock [B, S, C]
      -> pre_head_layer_norm [B, S, C] -> mean over tokens [B, C] -> head [B, classes]
"""

import logging
import os

import keras
import numpy as np
from keras import layers, ops

from keras_mixer.layers import (
    MixerBlock,
    PatchStem,
    check_gelu,
    check_image_size,
    check_positive_int,
    check_rate,
    float32_if_mixed,
    to_pair,
)
from keras_mixer.presets import fetch_preset, is_preset_name, preset_url
from keras_mixer.weights import Checkpoint, load_weights

# Table 1 of the paper (S/8 from the released gsam checkpoints). D_S = C/2 and D_C = 4C throughout.
VARIANTS = {
    "S/32": dict(patch_size=32, hidden_dim=512, num_blocks=8, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "S/16": dict(patch_size=16, hidden_dim=512, num_blocks=8, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "S/8": dict(patch_size=8, hidden_dim=512, num_blocks=8, tokens_mlp_dim=256, channels_mlp_dim=2048),
    "B/32": dict(patch_size=32, hidden_dim=768, num_blocks=12, tokens_mlp_dim=384, channels_mlp_dim=3072),
    "B/16": dict(patch_size=16, hidden_dim=768, num_blocks=12, tokens_mlp_dim=384, channels_mlp_dim=3072),
    "L/32": dict(patch_size=32, hidden_dim=1024, num_blocks=24, tokens_mlp_dim=512, channels_mlp_dim=4096),
    "L/16": dict(patch_size=16, hidden_dim=1024, num_blocks=24, tokens_mlp_dim=512, channels_mlp_dim=4096),
    "H/14": dict(patch_size=14, hidden_dim=1280, num_blocks=32, tokens_mlp_dim=640, channels_mlp_dim=5120),
}

log = logging.getLogger("keras_mixer")

# Small configurations of our own (not in the paper) for demos, tests and quick experiments.
SMALL_VARIANTS = {
    "T/2": dict(patch_size=2, hidden_dim=64, num_blocks=4, tokens_mlp_dim=32, channels_mlp_dim=256),
    "T/4": dict(patch_size=4, hidden_dim=64, num_blocks=4, tokens_mlp_dim=32, channels_mlp_dim=256),
    "T/16": dict(patch_size=16, hidden_dim=128, num_blocks=4, tokens_mlp_dim=64, channels_mlp_dim=512),
}
MODEL_NAMES = (*VARIANTS, *SMALL_VARIANTS)

POOLINGS = (None, "avg", "max")
DEFAULT_INPUT_SHAPE = (224, 224, 3)


def preprocess_input(x, data_format=None):
    """Scales uint8-range pixels [0, 255] to [-1, 1] as the official pipeline: (x - 127.5) / 127.5.

    For models built with `include_preprocessing=False`; the default models do this inside.
    Accepts a NumPy array (returns NumPy float32) or a tensor (returns a float tensor).
    `data_format` is accepted for keras.applications compatibility; the scaling is per pixel.
    """
    del data_format
    if isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        return (np.asarray(x, dtype="float32") - 127.5) / 127.5
    return (ops.cast(x, "float32") - 127.5) / 127.5


def drop_path_schedule(drop_path_rate, num_blocks):
    """Per-block stochastic-depth rates rising linearly from 0 (first block) to `drop_path_rate` (last)."""
    if num_blocks == 1:
        return [0.0]
    return [drop_path_rate * i / (num_blocks - 1) for i in range(num_blocks)]


def _image_input(input_tensor, input_shape):
    """Returns (the model's input tensor, its (H, W, channels) shape), validated."""
    if input_tensor is not None:
        if not keras.backend.is_keras_tensor(input_tensor):
            input_tensor = layers.Input(tensor=input_tensor, shape=input_shape)
        shape = tuple(input_tensor.shape[1:])
    else:
        shape = tuple(input_shape) if input_shape is not None else DEFAULT_INPUT_SHAPE
    if len(shape) != 3:
        raise ValueError(
            f"input_shape must be (height, width, channels) (channels last), got {shape!r}"
        )
    channels = shape[2]
    if channels is None or isinstance(channels, bool) or int(channels) <= 0:
        raise ValueError(f"The input channel count must be a positive integer (3 for RGB), got {channels!r}")
    if input_tensor is None:
        input_tensor = layers.Input(shape=shape, name="images")
    return input_tensor, shape


def variant_of(patch_size, hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim):
    """The VARIANTS name ("B/16") of an architecture, or None for a custom one."""
    config = dict(
        patch_size=to_pair("patch_size", patch_size),
        hidden_dim=hidden_dim,
        num_blocks=num_blocks,
        tokens_mlp_dim=tokens_mlp_dim,
        channels_mlp_dim=channels_mlp_dim,
    )
    for name, variant in VARIANTS.items():
        if {**variant, "patch_size": to_pair("patch_size", variant["patch_size"])} == config:
            return name
    return None


def _open_weights(weights, variant):
    """`weights` (a path or a preset name) -> a `Checkpoint` read into memory."""
    if isinstance(weights, Checkpoint):
        return weights
    if is_preset_name(weights) and not os.path.exists(weights):
        return Checkpoint(fetch_preset(weights, variant))
    path = os.fspath(weights)
    if not os.path.exists(path):
        if os.sep not in path and "." not in path:
            preset_url(path, variant)  # raises, listing the presets
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    return Checkpoint(path)


def MlpMixer(
    patch_size,
    hidden_dim,
    num_blocks,
    tokens_mlp_dim,
    channels_mlp_dim,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=None,
    classifier_activation="softmax",
    name="mlp_mixer",
    include_preprocessing=True,
    dropout_rate=0.0,
    drop_path_rate=0.0,
    gelu=None,
    seed=None,
):
    """Builds an MLP-Mixer as a Keras functional model.

    Args:
        patch_size: P, an int or (height, width) pair; image sides must be multiples of it.
        hidden_dim: C, the token width. num_blocks: N, the number of Mixer blocks.
        tokens_mlp_dim: D_S. channels_mlp_dim: D_C.
        include_top: end with the classification head ([B, classes]).
        weights: None (random init), a preset name ("imagenet1k", "imagenet21k", "sam", "gsam";
            see `keras_mixer.presets`) or a path to an official `.npz`, a timm `.pth` /
            `.safetensors`, a `.keras` or a `.weights.h5` file (told apart by content).
        input_tensor: optional Keras tensor (or tensor) to use as the image input.
        input_shape: (H, W, channels), default (224, 224, 3); any H, W that are multiples of P.
        pooling: only with `include_top=False`: None gives the token sequence [B, S, C] after the
            pre-head LayerNorm, "avg" the mean over tokens [B, C], "max" the maximum [B, C].
        classes: head width; default the checkpoint's class count when `weights` has a head, else
            1000. A count different from the checkpoint's gives a fresh zero head (logged).
        classifier_activation: head activation (None for logits).
        include_preprocessing: inputs are pixels in [0, 255], scaled to [-1, 1] inside the model.
            False: inputs must already be in [-1, 1] (see `preprocess_input`).
        dropout_rate: dropout inside every MLP.
        drop_path_rate: stochastic depth of the last block; block i gets i / (N - 1) of it.
        gelu: "tanh" (approximation, the official weights') or "exact" (timm's). Default: the
            form the `weights` were trained with, else "tanh".
        seed: seed for dropout and stochastic-depth masks.

    Returns:
        A `keras.Model`. Layer names follow the official checkpoint (`stem`, `MixerBlock_{i}`,
        `pre_head_layer_norm`, `head`).
    """
    patch = to_pair("patch_size", patch_size)
    hidden_dim = check_positive_int("hidden_dim", hidden_dim)
    num_blocks = check_positive_int("num_blocks", num_blocks)
    dropout_rate = check_rate("dropout_rate", dropout_rate)
    drop_path_rate = check_rate("drop_path_rate", drop_path_rate)
    if gelu is not None:
        check_gelu(gelu)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if include_top and pooling is not None:
        raise ValueError(
            f"pooling={pooling!r} applies only with include_top=False; with include_top=True the "
            f"model always averages over tokens before the head."
        )
    checkpoint = None
    if weights is not None:
        variant = variant_of(patch, hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim)
        checkpoint = _open_weights(weights, variant)
        # The GELU form and class count the weights were trained with, unless the caller says.
        gelu = check_gelu(gelu or checkpoint.gelu or "tanh")
        classes = checkpoint.classes if classes is None else classes
    classes = 1000 if classes is None else classes
    if include_top:
        classes = check_positive_int("classes", classes)

    images, shape = _image_input(input_tensor, input_shape)
    # Fails early, naming the size and the valid neighbours, before any layer is built.
    check_image_size(shape[:2], patch)
    grid = (shape[0] // patch[0], shape[1] // patch[1])
    trained_tokens = checkpoint.token_count() if checkpoint is not None else None
    if trained_tokens not in (None, grid[0] * grid[1]):
        # Weights trained at a smaller size: load them there, then expand (paper, Appendix C).
        from keras_mixer.resolution import expand_resolution, trained_grid

        if input_tensor is not None:
            raise ValueError(
                f"The weights were trained on {trained_tokens} patches, the input_tensor gives "
                f"{grid[0] * grid[1]}: build without input_tensor to expand the resolution automatically"
            )
        trained = trained_grid(trained_tokens, grid)
        log.info("%s: weights trained on a %dx%d patch grid, expanding to %dx%d", name, *trained, *grid)
        trained_model = MlpMixer(
            patch, hidden_dim, num_blocks, tokens_mlp_dim, channels_mlp_dim,
            include_top=include_top, weights=checkpoint,
            input_shape=(trained[0] * patch[0], trained[1] * patch[1], shape[2]),
            pooling=pooling, classes=classes, classifier_activation=classifier_activation, name=name,
            include_preprocessing=include_preprocessing, dropout_rate=dropout_rate,
            drop_path_rate=drop_path_rate, gelu=gelu, seed=seed,
        )
        return expand_resolution(trained_model, shape[:2])

    x = images
    if include_preprocessing:
        x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescaling")(x)
    x = PatchStem(hidden_dim, patch, name="stem")(x)
    for i, rate in enumerate(drop_path_schedule(drop_path_rate, num_blocks)):
        x = MixerBlock(
            tokens_mlp_dim,
            channels_mlp_dim,
            dropout_rate=dropout_rate,
            drop_path_rate=rate,
            gelu=gelu or "tanh",
            seed=None if seed is None else seed + i,
            name=f"MixerBlock_{i}",
        )(x)
    f32 = float32_if_mixed(None)
    x = layers.LayerNormalization(epsilon=1e-6, dtype=f32, name="pre_head_layer_norm")(x)
    if include_top:
        x = layers.GlobalAveragePooling1D(dtype=f32, name="avg_pool")(x)
        x = layers.Dense(
            classes, activation=classifier_activation, kernel_initializer="zeros", dtype=f32, name="head"
        )(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling1D(dtype=f32, name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling1D(dtype=f32, name="max_pool")(x)

    inputs = keras.utils.get_source_inputs(images) if input_tensor is not None else [images]
    model = keras.Model(_unwrap_single(inputs), x, name=name)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


def _default_name(variant):
    return "mixer_" + variant.replace("/", "").lower()  # "B/16" -> "mixer_b16"


def _variant_constructor(variant, func_name):
    config = VARIANTS[variant]
    default_name = _default_name(variant)

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
        return MlpMixer(
            **config,
            include_top=include_top,
            weights=weights,
            input_tensor=input_tensor,
            input_shape=input_shape,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            name=name,
            **kwargs,
        )

    constructor.__name__ = constructor.__qualname__ = func_name
    constructor.__doc__ = (
        f"Mixer-{variant}: patch {config['patch_size']}, C={config['hidden_dim']}, "
        f"{config['num_blocks']} blocks, D_S={config['tokens_mlp_dim']}, D_C={config['channels_mlp_dim']}.\n\n"
        f"Arguments as `MlpMixer` (keras.applications conventions), plus `include_preprocessing`, "
        f"`dropout_rate`, `drop_path_rate`, `gelu` and `seed` as keywords."
    )
    return constructor


MixerS32 = _variant_constructor("S/32", "MixerS32")
MixerS16 = _variant_constructor("S/16", "MixerS16")
MixerS8 = _variant_constructor("S/8", "MixerS8")
MixerB32 = _variant_constructor("B/32", "MixerB32")
MixerB16 = _variant_constructor("B/16", "MixerB16")
MixerL32 = _variant_constructor("L/32", "MixerL32")
MixerL16 = _variant_constructor("L/16", "MixerL16")
MixerH14 = _variant_constructor("H/14", "MixerH14")


def create_model(variant, **kwargs):
    """Builds a named variant ("B/16", ..., or a small "T/2", "T/4", "T/16") with `MlpMixer` keyword
    arguments."""
    config = VARIANTS.get(variant) or SMALL_VARIANTS.get(variant)
    if config is None:
        raise ValueError(f"Unknown Mixer variant {variant!r}; valid: {', '.join(MODEL_NAMES)}")
    kwargs.setdefault("name", _default_name(variant))
    return MlpMixer(**config, **kwargs)


def mixer_config(model):
    """The `MlpMixer` keyword arguments that rebuild `model`'s architecture (weights not included).

    Read from the layers themselves, so it works on any Mixer this package built, also after a
    `.keras` round trip.
    """
    names = {layer.name for layer in model.layers}
    blocks = [layer for layer in model.layers if isinstance(layer, MixerBlock)]
    stems = [layer for layer in model.layers if isinstance(layer, PatchStem)]
    if not blocks or not stems:
        raise ValueError(f"Model {model.name!r} is not a Mixer built by keras_mixer (no stem or MixerBlock layers)")
    stem, first, last = stems[0], blocks[0], blocks[-1]
    config = dict(
        patch_size=stem.patch_size,
        hidden_dim=stem.hidden_dim,
        num_blocks=len(blocks),
        tokens_mlp_dim=first.tokens_mlp_dim,
        channels_mlp_dim=first.channels_mlp_dim,
        input_shape=tuple(model.input_shape[1:]),
        include_top="head" in names,
        include_preprocessing="rescaling" in names,
        dropout_rate=first.dropout_rate,
        drop_path_rate=last.drop_path_rate,
        gelu=first.gelu,
        seed=first.seed,
        name=model.name,
    )
    if config["include_top"]:
        head = model.get_layer("head")
        config.update(classes=head.units, classifier_activation=keras.activations.serialize(head.activation))
    else:
        config["pooling"] = "avg" if "avg_pool" in names else "max" if "max_pool" in names else None
    return config


def _unwrap_single(inputs):
    # A one-element input list would make Keras warn on every call with a plain tensor.
    return inputs[0] if len(inputs) == 1 else inputs


def token_feature_model(model):
    """A model with the same inputs that returns every block's token features.

    Outputs a dict: "stem" and "MixerBlock_{i}" -> [B, S, C] (the residual stream after that
    block, before the pre-head LayerNorm). For token-mixing visualisation and linear probing.
    """
    names = [layer.name for layer in model.layers if layer.name == "stem" or layer.name.startswith("MixerBlock_")]
    if not names:
        raise ValueError(f"Model {model.name!r} has no 'stem' or 'MixerBlock_*' layers: not a Mixer")
    return keras.Model(_unwrap_single(model.inputs), {name: model.get_layer(name).output for name in names}, name=model.name + "_tokens")
