"""From a weights source to a ready Mixer: open the weights file, decide the build, build, load,
expand the resolution.

    source: preset name | official .npz | timm .pth/.safetensors | .keras | .weights.h5
            | keras-hub preset folder | timm repo folder | hf:// or kaggle:// (either folder, fetched)
      -> WeightsFile (format, GELU form, pixel normalisation, {official key: array}, what it records)
      -> decide: classes (the file's unless asked), GELU form (the file's unless asked),
         trained patch grid vs the requested one (a larger multiple: block-diagonal expansion)
      -> cls(...) with the weights assigned, all or nothing

This is the only module that knows both files and models. It never imports the model module: the
functions that build take the model class (`MlpMixer`) as their first argument, keras-hub style, so
`MlpMixer.from_preset` can call them.
"""

import logging
import os

import keras

from keras_mixer.argument_checks import check_gelu, check_image_size, to_pair
from keras_mixer.model.pixels import EvalPreprocessing
from keras_mixer.model.resolution_expansion import expand_params, expansion_factors, trained_grid
from keras_mixer.model.trained_on import TrainedOn
from keras_mixer.model.variants import ARCHITECTURE, DEFAULT_INPUT_SHAPE, variant_config, variant_name, variant_of
from keras_mixer.weights_io import file_formats, preset_folders, presets, source_kinds, timm_repos
from keras_mixer.weights_io.official_keys import (
    WeightsError,
    architecture_of,
    assign,
    is_mixer,
    keras_metadata,
    model_params,
    quantization_modes,
)

log = logging.getLogger("keras_mixer")


class WeightsFile:
    """A weights file read into memory.

    Attributes:
        path, format: where it is and what it is (`file_formats.NPZ`, ...).
        gelu: the GELU form it was trained with, or None when unknown.
        params: {official key: array}; None for a bare `.weights.h5`, readable only into a model.
        config: the `MlpMixer` config a `.keras` file or preset folder records, else None.
        trained_on: what the source records of its training (`TrainedOn`: a preset, a preset
            folder, a timm repo or a `.keras` written by the trainers record it; other files only
            the default preprocessing).
        name: a model name for it (the preset name or the file's stem).
        normalization: {"pixel_mean", "pixel_std"} the weights were trained with ({}: official).
        model: the whole model, for a quantized `.keras` file or preset folder (loaded as saved).
    """

    def __init__(self, path, trained_on=None, name=None):
        self.path = os.fspath(path)
        self.format = file_formats.detect_format(self.path)
        self.gelu = file_formats.SOURCE_GELU.get(self.format)
        self.params, self.config, self.trained_on, self.model = None, None, trained_on or TrainedOn(), None
        self.name = name or os.path.basename(self.path).split(".")[0].lower().replace("-", "_")
        if self.format in (file_formats.KERAS, file_formats.PRESET_FOLDER):
            if self.format == file_formats.KERAS:
                model = keras.saving.load_model(self.path, safe_mode=True, compile=False)
                recorded = TrainedOn.from_dict(keras_metadata(self.path))
            else:
                model, recorded = preset_folders.load_model(self.path)
                self.name = name or model.name
            self.trained_on = trained_on or recorded
            if quantization_modes(model):
                self.model = model  # int8/float8 kernels are no weights to assign: the model is the source
            else:
                self.params = model_params(model)
            if is_mixer(model):
                self.config, self.gelu = model.get_config(), model.gelu
        elif self.format == file_formats.TIMM_FOLDER:
            repo = timm_repos.TimmRepo(self.path)
            self.name, self.trained_on = name or repo.name.replace(".", "_"), trained_on or repo.trained_on
            self.params = file_formats.read_arrays(repo.weights)[1]
            held = architecture_of(self.params)
            if held != repo.expected or self.classes != repo.classes:
                raise WeightsError(
                    f"{repo.weights!r} holds weights of patch {held['patch']}, width {held['width']}, {held['blocks']} "
                    f"blocks and {self.classes} classes, but its config.json says {repo.architecture} (patch "
                    f"{repo.expected['patch']}, width {repo.expected['width']}, {repo.expected['blocks']} blocks) with "
                    f"{repo.classes} classes: the files do not belong together"
                )
        elif self.format != file_formats.KERAS_H5:
            self.format, self.params = file_formats.read_arrays(self.path, self.format)

    @property
    def normalization(self):
        if self.config is not None:
            pairs = {k: self.config.get(k) for k in ("pixel_mean", "pixel_std")}
        else:
            pairs = dict(pixel_mean=self.trained_on.pixel_mean, pixel_std=self.trained_on.pixel_std)
        return {k: v for k, v in pairs.items() if v is not None}

    @property
    def classes(self):
        """The head's class count, or None when headless or unknown before loading (.weights.h5)."""
        if self.params is not None and "head/bias" in self.params:
            return int(self.params["head/bias"].shape[0])
        return None

    def token_count(self):
        """S of the first block's token MLP (the trained number of patches), or None when unknown."""
        kernel = (self.params or {}).get("MixerBlock_0/token_mixing/Dense_0/kernel")
        return None if kernel is None else int(kernel.shape[0])

    def architecture(self):
        """The `MlpMixer` architecture arguments the weights' shapes give (patch, C, N, D_S, D_C)."""
        if self.config is not None:
            return {k: self.config[k] for k in ARCHITECTURE}
        p = self.params or {}
        needed = (
            "stem/kernel",
            "MixerBlock_0/token_mixing/Dense_0/kernel",
            "MixerBlock_0/channel_mixing/Dense_0/kernel",
        )
        if any(key not in p for key in needed):
            raise WeightsError(f"{self.path!r} lacks {', '.join(k for k in needed if k not in p)}: not Mixer weights")
        known = architecture_of(p)
        return dict(
            patch_size=known["patch"],
            hidden_dim=known["width"],
            num_blocks=known["blocks"],
            tokens_mlp_dim=int(p["MixerBlock_0/token_mixing/Dense_0/kernel"].shape[1]),
            channels_mlp_dim=int(p["MixerBlock_0/channel_mixing/Dense_0/kernel"].shape[1]),
        )

    def trained_input_shape(self):
        """The (H, W, channels) the weights were trained at: recorded, else a square patch grid."""
        if self.config is not None:
            return tuple(self.config["input_shape"])
        stem, tokens = self.params["stem/kernel"].shape, self.token_count()
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError(
                f"{self.path!r} was trained on {tokens} patches, not a square grid: give input_shape=(H, W, channels)"
            )
        return (side * int(stem[0]), side * int(stem[1]), int(stem[2]))

    def arrays_for(self, model):
        """{official key: array}; a bare .weights.h5 is read through Keras into a twin of `model`."""
        if self.params is not None:
            return self.params
        # A bare weights file has no architecture: Keras' own rule, it must fit the model's.
        twin = type(model).from_config(model.get_config())
        try:
            twin.load_weights(self.path)
        except Exception as e:
            raise WeightsError(f"{self.path!r} does not fit model {model.name!r}: {e}") from None
        return model_params(twin)


def open_weights(source, variant=None):
    """A preset name (or a release such as "imagenet21k" with `variant`), a weights or .keras file,
    a preset or timm repo folder, an hf:// or kaggle:// name, a finished training workdir (its
    model.keras), what `source_kinds.resolve` found of one of them (a `Source`), or an open
    `WeightsFile` -> a `WeightsFile`."""
    if isinstance(source, WeightsFile):
        return source
    found = source_kinds.resolve(source, variant)
    if found.kind in ("keras", "weights", "preset_folder", "timm"):
        return WeightsFile(found.path, name=found.name)
    if found.kind == "preset":
        meta = presets.PRESETS[found.path]
        class_names = dataset = None
        if meta["classes"] == 1000:  # the ImageNet-1k label order of decode_predictions
            from keras_mixer.weights_io.imagenet_classes import class_names as imagenet_class_names

            dataset, class_names = "imagenet2012", imagenet_class_names()
        trained_on = TrainedOn(
            dataset=dataset,
            class_names=class_names,
            preprocessing=EvalPreprocessing.from_dict(meta["eval_preprocessing"]),
            model=meta["variant"],
            image_size=meta["image_size"],
        )
        return WeightsFile(presets.fetch_preset(found.path), trained_on=trained_on, name=found.path)
    finished = source_kinds.finished_run(found)
    if finished is not None:
        return WeightsFile(finished.path)
    raise ValueError(
        f"{os.fspath(source)!r} is a {found.kind}"
        + (" whose run has not finished (no model.keras yet)" if found.kind == "workdir" else "")
        + ": weights are read from a .keras or weights file or a preset; evaluate.py and export.py read this one"
    )


def _load(model, weights, expansion=None):
    """Assigns an open `WeightsFile` to `model`, warning on a GELU mismatch. `expansion`: (trained
    grid, factors) when the model is the block-diagonal expansion of the weights' size."""
    if weights.gelu and model.gelu != weights.gelu:
        log.warning(
            "%s was trained with the %s GELU but the model uses %s: outputs will differ slightly; "
            "build the model with gelu=%r for parity",
            weights.path,
            weights.gelu,
            model.gelu,
            weights.gelu,
        )
    params = weights.arrays_for(model) if expansion is None else expand_params(weights.params, *expansion)
    assign(model, params, weights.path)
    return model


def load_weights(model, source):
    """Loads any Mixer weights file (or preset) into a built `MlpMixer`, in place; returns the model.

    The head is loaded when its class count matches, set to zeros (logged) when it differs, and
    skipped for models without a head. Missing or unexpected keys and shape mismatches raise
    `WeightsError` (a ValueError) before any weight changes; the model is left as it was.
    """
    return _load(model, open_weights(source, model.variant))


def _requested_shape(input_tensor, input_shape):
    if input_tensor is not None:
        return tuple(input_tensor.shape[1:])
    return tuple(input_shape) if input_shape is not None else DEFAULT_INPUT_SHAPE


def build(cls, architecture, weights=None, *, classes=None, gelu=None, input_shape=None, input_tensor=None, **kwargs):
    """A `cls` (`MlpMixer`) of `architecture` (the five `ARCHITECTURE` numbers), with `weights` loaded.

    Args:
        weights: None (fresh), a preset name (or a release with a paper variant), a weights file
            path or a `WeightsFile`.
        classes: head width; default the weights' class count when they have a head, else 1000.
            Another count than the weights' gives a zero head (logged).
        gelu: default the form the weights were trained with, else "tanh".
        input_shape / input_tensor: the input; weights trained on a smaller patch grid whose sides
            divide the requested grid's are expanded block-diagonally (paper, Appendix C).
        **kwargs: the other `MlpMixer` arguments.
    """
    architecture = {k: architecture[k] for k in ARCHITECTURE}
    if weights is not None:
        weights = open_weights(weights, variant_of(architecture))
        gelu = gelu or weights.gelu
        classes = weights.classes if classes is None else classes
        for key, value in weights.normalization.items():  # the pixels the weights expect
            kwargs.setdefault(key, value)
    common = dict(
        classes=1000 if classes is None else classes,
        gelu=check_gelu(gelu or "tanh"),
        input_shape=input_shape,
        input_tensor=input_tensor,
        **kwargs,
    )
    if weights is None:
        return cls(**architecture, **common)
    shape = _requested_shape(input_tensor, input_shape)
    patch = to_pair("patch_size", architecture["patch_size"])
    check_image_size(shape[:2], patch)  # the size error first, before any weights are compared
    grid = (shape[0] // patch[0], shape[1] // patch[1])
    trained_tokens = weights.token_count()
    if trained_tokens in (None, grid[0] * grid[1]):
        return _load(cls(**architecture, **common), weights)
    # Weights trained at a smaller size: the token MLPs become block-diagonal (paper, Appendix C).
    trained = trained_grid(trained_tokens, grid)
    factors = expansion_factors(trained, grid)
    copies = factors[0] * factors[1]
    log.info("%s: weights trained on a %dx%d patch grid, expanding to %dx%d", weights.path, *trained, *grid)
    model = cls(**{**architecture, "tokens_mlp_dim": architecture["tokens_mlp_dim"] * copies}, **common)
    return _load(model, weights, expansion=(trained, factors))


def from_preset(cls, source, **kwargs):
    """`MlpMixer.from_preset`: a `cls` from a preset name or a weights file; the architecture, input
    size, GELU form and classes come from the source unless `kwargs` say otherwise."""
    weights = open_weights(source)
    if weights.model is not None:  # quantized: loaded as it was saved
        if set(kwargs) - {"name"}:
            raise ValueError(
                f"{weights.path!r} holds a quantized model, which loads as saved: build from its float preset with "
                f"{', '.join(sorted(set(kwargs) - {'name'}))} and quantize that"
            )
        return weights.model
    kwargs.setdefault("name", weights.name)
    if kwargs.get("input_tensor") is None and kwargs.get("input_shape") is None:
        kwargs["input_shape"] = weights.trained_input_shape()
    if weights.config is not None:
        for key in ("include_preprocessing", "classifier_activation"):
            kwargs.setdefault(key, weights.config.get(key))
    return build(cls, weights.architecture(), weights, **kwargs)


def create(cls, variant, weights=None, **kwargs):
    """A `cls` of a named variant ("B/16", or a small "T/2") with `build` arguments."""
    kwargs.setdefault("name", variant_name(variant))
    return build(cls, variant_config(variant), weights, **kwargs)
