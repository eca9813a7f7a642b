"""The Mixer architecture: `MlpMixer`, a Keras model that owns its configuration.

    image [B, H, W, 3] -> (Rescaling to [-1, 1]) -> stem [B, S, C] -> N x MixerBlock [B, S, C]
      -> pre_head_layer_norm [B, S, C] -> mean over tokens [B, C] -> head [B, classes]

This module builds architectures, with fresh weights; the variant tables are `keras_mixer.model.variants`.
Opening weights files and presets and the resolution change live in `keras_mixer.weights_io.loader` and
`keras_mixer.model.resolution_expansion`, which never import this module: `from_preset` hands them this class, as
keras-hub's `from_preset` does. The keras.applications-style constructors (`MixerB16(weights=...)`)
are in `keras_mixer.model.applications`.
"""

import keras
import numpy as np
from keras import layers, ops

from keras_mixer.argument_checks import (
    check_gelu,
    check_image_size,
    check_positive_int,
    check_rate,
    check_recompute,
    to_pair,
)
from keras_mixer.model.layers import LayerNorm, MixerBlock, PatchStem, float32_if_mixed, policy_of
from keras_mixer.model.pixels import pixel_normalization, scale_pixels
from keras_mixer.model.variants import (  # noqa: F401  (the tables stay importable from here)
    ARCHITECTURE,
    DEFAULT_INPUT_SHAPE,
    MODEL_NAMES,
    SMALL_VARIANTS,
    VARIANTS,
    variant_config,
    variant_name,
    variant_of,
)
from keras_mixer.weights_io import loader, preset_folders

POOLINGS = (None, "avg", "max")


def preprocess_input(x, data_format=None):
    """Scales uint8-range pixels [0, 255] to [-1, 1] as the official pipeline (x / 127.5 - 1).

    For models built with `include_preprocessing=False`; the default models do this inside.
    Accepts a NumPy array (returns NumPy float32) or a tensor (returns a float tensor).
    `data_format` is accepted for keras.applications compatibility; the scaling is per pixel.
    """
    del data_format
    if isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        return scale_pixels(np.asarray(x, dtype="float32"))
    return scale_pixels(ops.cast(x, "float32"))


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
        raise ValueError(f"input_shape must be (height, width, channels) (channels last), got {shape!r}")
    channels = shape[2]
    if channels is None or isinstance(channels, bool) or int(channels) <= 0:
        raise ValueError(f"The input channel count must be a positive integer (3 for RGB), got {channels!r}")
    if input_tensor is None:
        input_tensor = layers.Input(shape=shape, name="images")
    return input_tensor, shape


@keras.saving.register_keras_serializable(package="keras_mixer")
class MlpMixer(keras.Model):
    """An MLP-Mixer as a Keras model (a functional graph inside), with fresh weights.

    Args:
        patch_size: P, an int or (height, width) pair; image sides must be multiples of it.
        hidden_dim: C, the token width. num_blocks: N, the number of Mixer blocks.
        tokens_mlp_dim: D_S. channels_mlp_dim: D_C.
        include_top: end with the classification head ([B, classes]).
        input_shape: (H, W, channels), default (224, 224, 3); any H, W that are multiples of P.
        pooling: only with `include_top=False`: None gives the token sequence [B, S, C] after the
            pre-head LayerNorm, "avg" the mean over tokens [B, C], "max" the maximum [B, C].
        classes: head width.
        classifier_activation: head activation (None for logits).
        include_preprocessing: inputs are pixels in [0, 255], normalised inside the model (to
            [-1, 1], or as `pixel_mean` and `pixel_std` say). False: inputs must already be
            normalised (see `preprocess_input`, the official [-1, 1]).
        pixel_mean: the pixel mean the weights were trained with, timm's form of a normalisation,
            (pixels / 255 - mean) / std: a number or 3 (R, G, B). None: the official 0.5.
        pixel_std: the std of that normalisation. None: the official 0.5 (so [-1, 1]); MIIL's
            ImageNet-21K-P weights use mean 0, std 1 ([0, 1]).
        dropout_rate: dropout inside every MLP.
        drop_path_rate: stochastic depth of the last block; block i gets i / (N - 1) of it.
        gelu: "tanh" (the approximation the official weights use) or "exact" (timm's).
        recompute: recompute the GELUs in the backward pass instead of keeping their intermediates
            (less memory; same outputs and gradients). None: on with Keras' JAX backend on a GPU,
            off otherwise. True or False forces it.
        seed: seed for dropout and stochastic-depth masks.
        input_tensor: optional Keras tensor (or tensor) to use as the image input (not part of
            the config: a model rebuilt from its config gets a fresh input).
        dtype: the layers' dtype policy: a name ("bfloat16", "mixed_bfloat16"), a
            `keras.DTypePolicy`, or a `keras.dtype_policies.DTypePolicyMap` from layer paths
            ("MixerBlock_0/token_mixing/Dense_0") to policies, keras-hub style (a quantized
            policy there builds that layer quantized). None: the global policy.

    Layer names follow the official parameter tree (`stem`, `MixerBlock_{i}`,
    `pre_head_layer_norm`, `head`). `get_config()` returns exactly these arguments, so
    `MlpMixer.from_config(model.get_config())` rebuilds the architecture. Pretrained weights:
    `MlpMixer.from_preset(...)` or the variant constructors (`keras_mixer.MixerB16(weights=...)`).
    """

    def __init__(
        self,
        patch_size,
        hidden_dim,
        num_blocks,
        tokens_mlp_dim,
        channels_mlp_dim,
        include_top=True,
        input_shape=None,
        pooling=None,
        classes=1000,
        classifier_activation="softmax",
        include_preprocessing=True,
        dropout_rate=0.0,
        drop_path_rate=0.0,
        gelu="tanh",
        recompute=None,
        seed=None,
        input_tensor=None,
        pixel_mean=None,
        pixel_std=None,
        dtype=None,
        name="mlp_mixer",
        **kwargs,
    ):
        patch = to_pair("patch_size", patch_size)
        hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        num_blocks = check_positive_int("num_blocks", num_blocks)
        tokens_mlp_dim = check_positive_int("tokens_mlp_dim", tokens_mlp_dim)
        channels_mlp_dim = check_positive_int("channels_mlp_dim", channels_mlp_dim)
        dropout_rate = check_rate("dropout_rate", dropout_rate)
        drop_path_rate = check_rate("drop_path_rate", drop_path_rate)
        check_gelu(gelu)
        check_recompute(recompute)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if include_top and pooling is not None:
            raise ValueError(
                f"pooling={pooling!r} applies only with include_top=False; with include_top=True the "
                f"model always averages over tokens before the head."
            )
        if include_top:
            classes = check_positive_int("classes", classes)
        if not isinstance(classifier_activation, (str, type(None))):
            classifier_activation = keras.activations.serialize(classifier_activation)
        scale, offset = pixel_normalization(pixel_mean, pixel_std)
        images, shape = _image_input(input_tensor, input_shape)
        # Fails early, naming the size and the valid neighbours, before any layer is built.
        check_image_size(shape[:2], patch)

        # A saved config holds the policy serialized; every layer gets it (a map: by its own path).
        dtype = policy_of(dtype)
        x = images
        if include_preprocessing:
            x = layers.Rescaling(scale, offset=offset, dtype=dtype, name="rescaling")(x)
        x = PatchStem(hidden_dim, patch, dtype=dtype, name="stem")(x)
        for i, rate in enumerate(drop_path_schedule(drop_path_rate, num_blocks)):
            x = MixerBlock(
                tokens_mlp_dim,
                channels_mlp_dim,
                dropout_rate=dropout_rate,
                drop_path_rate=rate,
                gelu=gelu,
                recompute=recompute,
                seed=None if seed is None else seed + i,
                dtype=dtype,
                name=f"MixerBlock_{i}",
            )(x)
        # Normalisation, pooling and logits in float32 under mixed precision.
        f32 = float32_if_mixed(dtype)
        x = LayerNorm(epsilon=1e-6, dtype=f32, name="pre_head_layer_norm")(x)
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
        super().__init__(inputs=_unwrap_single(inputs), outputs=x, dtype=dtype, name=name, **kwargs)
        if isinstance(dtype, keras.dtype_policies.DTypePolicyMap):
            # Each layer now built (its path known) takes its own entry of the map: Keras 3.15's Dense
            # saves a quantized kernel's scale only when its `dtype_policy` itself is quantized, and
            # under a map that property is the map.
            for layer in self._flatten_layers(include_self=False):
                if layer.path and isinstance(layer.dtype_policy, keras.dtype_policies.DTypePolicyMap):
                    layer._dtype_policy = layer.dtype_policy[layer.path]

        self.patch_size = patch
        self.hidden_dim = hidden_dim
        self.num_blocks = num_blocks
        self.tokens_mlp_dim = tokens_mlp_dim
        self.channels_mlp_dim = channels_mlp_dim
        self.image_shape = tuple(int(d) for d in shape)
        self.include_top = bool(include_top)
        self.pooling = pooling
        self.classes = classes if include_top else None
        self.classifier_activation = classifier_activation if include_top else None
        self.include_preprocessing = bool(include_preprocessing)
        self.dropout_rate = dropout_rate
        self.drop_path_rate = drop_path_rate
        self.gelu = gelu
        self.recompute = recompute
        self.seed = seed
        # Kept as given (None: official), so the config of an official model is version 0.2's.
        self.pixel_mean, self.pixel_std = _tuple_or_none(pixel_mean), _tuple_or_none(pixel_std)
        self._given_dtype = dtype

    @property
    def grid_size(self):
        """The (H/P, W/P) patch grid; S = its product."""
        return (self.image_shape[0] // self.patch_size[0], self.image_shape[1] // self.patch_size[1])

    @property
    def variant(self):
        """The paper's variant name ("B/16") of this architecture, or None (see `variant_of`)."""
        return variant_of({k: getattr(self, k) for k in ARCHITECTURE})

    def get_config(self):
        return dict(
            patch_size=self.patch_size,
            hidden_dim=self.hidden_dim,
            num_blocks=self.num_blocks,
            tokens_mlp_dim=self.tokens_mlp_dim,
            channels_mlp_dim=self.channels_mlp_dim,
            include_top=self.include_top,
            input_shape=self.image_shape,
            pooling=self.pooling,
            classes=self.classes,
            classifier_activation=self.classifier_activation,
            include_preprocessing=self.include_preprocessing,
            dropout_rate=self.dropout_rate,
            drop_path_rate=self.drop_path_rate,
            gelu=self.gelu,
            recompute=self.recompute,
            seed=self.seed,
            name=self.name,
            trainable=self.trainable,
            **{k: getattr(self, k) for k in ("pixel_mean", "pixel_std") if getattr(self, k) is not None},
            **self._dtype_config(),
        )

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Keras' `Model.quantize` ("int8", "float8", "int4", ...), by default over the Dense layers:
        the only ones Keras quantizes in a Mixer (the stem is a convolution; LayerNorms, pooling and
        reshapes have no product), so the others are passed over without a warning each. The
        model's config records the quantized layers, so a saved quantized model loads back."""
        if filters is None:
            filters = _is_dense
        super().quantize(mode, config=config, filters=filters, **kwargs)

    def _dtype_config(self):
        """{"dtype": ...} where the layers' policies are not simply the global one: the policy given,
        or, where any layer's differs from it (`quantize` changes a Dense layer's), a
        `DTypePolicyMap` of those layers by path, keras-hub style. {} otherwise, as version 0.2 wrote."""
        given = self._given_dtype
        default = given.default_policy if isinstance(given, keras.dtype_policies.DTypePolicyMap) else given
        default = default or keras.config.dtype_policy()
        differ = {}
        for layer in self._flatten_layers(include_self=False):
            if layer.path and layer.dtype_policy.name != default.name:  # the input layer has no path
                differ[layer.path] = layer.dtype_policy
        if any(policy.quantization_mode for policy in differ.values()) or isinstance(
            given, keras.dtype_policies.DTypePolicyMap
        ):
            return dict(dtype=keras.dtype_policies.DTypePolicyMap(default, differ))
        return {} if given is None else dict(dtype=given)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # JSON turns tuples into lists.
        config["patch_size"] = tuple(config["patch_size"])
        config["input_shape"] = tuple(config["input_shape"])
        return cls(**config)

    @classmethod
    def from_preset(cls, preset, **kwargs):
        """A Mixer with pretrained weights, keras-hub style.

        Args:
            preset: a preset name (`keras_mixer.list_presets()`, e.g. "mixer_b16_imagenet1k") or
                a weights file (official `.npz`, timm `.pth`/`.safetensors`, `.keras`) whose
                architecture is read from the file.
            **kwargs: `MlpMixer` arguments for the build: `input_shape` (a multiple of the trained
                size expands the resolution), `classes` (another count gives a zero head),
                `include_top`, `pooling`, `classifier_activation`, `dropout_rate`, ...
        """
        # The loader builds whatever class it is handed (keras-hub style); it never imports this module.
        return loader.from_preset(cls, preset, **kwargs)

    def save_to_preset(self, preset_dir, trained_on=None, top1=None):
        """Writes this model as a keras-hub preset folder (config.json, model.weights.h5,
        metadata.json) at `preset_dir`, a new or empty folder; `trained_on` (a
        `keras_mixer.model.trained_on.TrainedOn`: class names, evaluation preprocessing, ...) and `top1`
        go into metadata.json. `MlpMixer.from_preset(preset_dir)` reads it back, as do
        `keras_mixer.upload_preset` and keras-hub's own `upload_preset`."""
        return preset_folders.save_to_preset(self, preset_dir, trained_on=trained_on, top1=top1)


def _tuple_or_none(value):
    return tuple(value) if hasattr(value, "__len__") else value


def _is_dense(layer):
    return isinstance(layer, layers.Dense)


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
    outputs = {name: model.get_layer(name).output for name in names}
    return keras.Model(_unwrap_single(model.inputs), outputs, name=model.name + "_tokens")
