"""A Mixer's weights as {official key: array}: reading them out of a model, assigning them into one
(all or nothing), and writing them as weights files.

Keras variable paths already follow the official tree (`MixerBlock_0/token_mixing/Dense_0/kernel`);
only LayerNorm leaves differ (Keras `gamma`/`beta`, Flax `scale`/`bias`). So the mapping is a rename.
Opening weights files and deciding what to build from them is the loader's job (`keras_mixer.weights_io.loader`).
"""

import json
import logging
import os
import zipfile

import keras
import numpy as np

from keras_mixer.atomic_files import TMP_PREFIX, readable_file_mode, strict_json
from keras_mixer.weights_io import file_formats
from keras_mixer.weights_io.file_formats import WeightsError

log = logging.getLogger("keras_mixer")

_LEAVES = {"kernel": "kernel", "bias": "bias", "gamma": "scale", "beta": "bias"}
HEAD_KEYS = ("head/kernel", "head/bias")


MIXER_CLASS = "keras_mixer>MlpMixer"  # MlpMixer's registered Keras name


def is_mixer(model):
    """Whether `model` is a `keras_mixer.MlpMixer` (or a subclass), known by its registered Keras
    name: the loader and the resolution change sit below the model module and do not import it."""
    return any(keras.saving.get_registered_name(c) == MIXER_CLASS for c in type(model).__mro__)


def _official_key(variable):
    scope, _, leaf = variable.path.rpartition("/")
    return f"{scope}/{_LEAVES[leaf]}"


def quantization_modes(model):
    """The quantization modes of the model's layers ({"int8"} after `quantize("int8")`), or empty."""
    return {layer.quantization_mode for layer in model._flatten_layers()} - {None}


def mixer_variables(model):
    """{official key: Keras variable} for every weight of a Mixer (not RNG states). A quantized
    model is refused: weights files hold the float weights, and its kernels are int8 or float8."""
    modes = quantization_modes(model)
    if modes:
        raise WeightsError(
            f"model {model.name!r} is quantized ({', '.join(sorted(modes))}): weights files hold float weights; "
            f"save it as a .keras file or a preset folder, which keep the quantized layers"
        )
    return {_official_key(v): v for v in model.weights if v.path.rpartition("/")[2] in _LEAVES}


def model_params(model):
    """The model's weights as {official key: NumPy array} (the canonical form of every weights file)."""
    return {key: keras.ops.convert_to_numpy(v) for key, v in mixer_variables(model).items()}


def save_npz(model, path):
    """Writes the model in the official .npz layout (loadable by the official code), atomically."""
    file_formats.write_npz(model_params(model), path)


def save_timm(model, path):
    """Writes the model as a timm state_dict in a .safetensors file, atomically."""
    file_formats.write_timm_safetensors(model_params(model), path)


def architecture_of(params):
    """What a {official key: array} set of weights says of its architecture: patch (h, w), width C
    and number of blocks (None for absent parts)."""
    stem = params.get("stem/kernel")  # [patch_h, patch_w, channels, C]
    blocks = {key.split("/")[0] for key in params if key.startswith("MixerBlock_")}
    return dict(
        patch=None if stem is None else tuple(int(d) for d in stem.shape[:2]),
        width=None if stem is None else int(stem.shape[3]),
        blocks=len(blocks) or None,
    )


def _describe(arch):
    names = dict(patch="patch", width="width C", blocks="blocks")
    return ", ".join(f"{names[k]} {v}" for k, v in arch.items() if v is not None)


def _check_architecture(params, targets, path):
    """WeightsError naming both architectures when the weights are of another Mixer variant."""
    have, want = architecture_of(params), architecture_of(targets)
    differ = [k for k in have if have[k] is not None and want[k] is not None and have[k] != want[k]]
    if differ:
        raise WeightsError(
            f"{path!r} holds a different Mixer architecture ({', '.join(differ)} differ): the weights are "
            f"{_describe(have)}; the model is {_describe(want)}. Build the model as the weights were trained "
            f"(for example the variant constructor whose numbers match), or use weights of this model's variant."
        )


def _head_policy(params, targets, path):
    """Drops or keeps the weights file's head to fit the model.

    Returns (params, head keys to zero, a note to log once the weights are in, or None)."""
    ckpt_head = [k for k in HEAD_KEYS if k in params]
    model_head = [k for k in HEAD_KEYS if k in targets]
    without_head = {k: v for k, v in params.items() if k not in HEAD_KEYS}
    if not model_head:
        note = f"{path}: head not loaded (model has include_top=False)" if ckpt_head else None
        return without_head, [], note
    if ckpt_head and params["head/kernel"].shape == tuple(targets["head/kernel"].shape):
        return params, [], None
    if ckpt_head:
        note = (
            f"{path}: its head has {params['head/bias'].shape[0]} classes, model has "
            f"{targets['head/bias'].shape[0]}: head set to zeros (fine-tuning init)"
        )
    else:
        note = f"{path} has no head: model head set to zeros"
    return without_head, model_head, note


def _list(keys, limit=8):
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_fit(params, targets, path):
    """Raises WeightsError naming every missing/unexpected key or the first shape mismatch."""
    missing = set(targets) - set(params)
    unexpected = set(params) - set(targets)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
        raise WeightsError(f"{path!r} does not fit the model: " + "; ".join(parts))
    for key, variable in targets.items():
        have, want = tuple(params[key].shape), tuple(variable.shape)
        if have != want:
            message = f"{path!r}: shape mismatch for {key!r}: weights file {have}, model {want}"
            if "token_mixing" in key:
                message += (
                    ". The token-mixing weights depend on the number of patches: the weights were "
                    "trained at another input size, which needs the resolution expansion "
                    "(keras_mixer.expand_resolution) to a size that is an integer multiple of it"
                )
            raise WeightsError(message)


def assign(model, params, path="<params>"):
    """Assigns {official key: array} to `model` after checking every key and shape; all or nothing."""
    targets = mixer_variables(model)
    _check_architecture(params, targets, path)
    params, zero_heads, note = _head_policy(params, targets, path)
    _check_fit(params, {k: v for k, v in targets.items() if k not in zero_heads}, path)
    backup = {k: keras.ops.convert_to_numpy(v) for k, v in targets.items()}
    try:
        for key, variable in targets.items():
            if key in zero_heads:
                variable.assign(np.zeros(variable.shape, variable.dtype))
            else:
                variable.assign(params[key].astype(variable.dtype))
    except BaseException:
        for key, variable in targets.items():
            variable.assign(backup[key])
        raise
    if note:
        log.log(logging.WARNING if zero_heads else logging.INFO, "%s", note)


# What a trained model was trained on (data set, class names, evaluation preprocessing), stored as
# one extra member of its .keras archive; Keras ignores members it does not know.
KERAS_METADATA = "keras_mixer.json"


def save_keras(model, path, metadata=None):
    """`model.save(path)` written atomically (a temporary .keras beside it, renamed into place),
    with `metadata` (a JSON-able dict) recorded inside the archive. Returns `path`."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{name}")
    try:
        model.save(tmp)
        if metadata is not None:
            with zipfile.ZipFile(tmp, "a") as archive:
                archive.writestr(KERAS_METADATA, json.dumps(strict_json(metadata), indent=2))
        os.chmod(tmp, readable_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def keras_metadata(path):
    """The metadata `save_keras` recorded in a .keras archive, or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            if KERAS_METADATA in archive.namelist():
                return json.loads(archive.read(KERAS_METADATA))
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    return None
