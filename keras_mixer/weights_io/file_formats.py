"""Reading and writing Mixer weights files, without pickle.

Every format is read into one canonical form: a dict from the official Flax key
(`MixerBlock_3/token_mixing/Dense_0/kernel`) to a NumPy array in the Flax layout (conv kernels
HWIO, Dense kernels [in, out]), which equals the Keras layout.

Formats, recognised by content (the file name is not trusted):
  - official `.npz`: '/'-joined Flax keys; trained with the tanh GELU.
  - timm state_dict as `.safetensors` or `.pth` (`torch.load(weights_only=True)`); exact GELU.
  - Keras `.keras` archives and `.weights.h5` files (read by the weights module through Keras).
"""

import json
import os
import re
import zipfile

import numpy as np

from keras_mixer.atomic_files import atomic_write

NPZ, TIMM_SAFETENSORS, TIMM_TORCH, KERAS, KERAS_H5 = "npz", "timm-safetensors", "timm-torch", "keras", "keras-h5"
# Folders: a keras-hub preset folder, a timm repo folder (config.json + model.safetensors).
PRESET_FOLDER, TIMM_FOLDER = "preset-folder", "timm-folder"
# The GELU form each source was trained with.
SOURCE_GELU = {NPZ: "tanh", TIMM_SAFETENSORS: "exact", TIMM_TORCH: "exact", TIMM_FOLDER: "exact"}

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model."""


def detect_format(path):
    """Returns one of NPZ, TIMM_SAFETENSORS, TIMM_TORCH, KERAS, KERAS_H5 from the file's content, or
    PRESET_FOLDER or TIMM_FOLDER for a folder."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = folder_format(path)
        if found is None:
            raise WeightsError(
                f"folder {path!r} is neither a keras-hub preset folder (config.json, model.weights.h5, metadata.json) "
                f"nor a timm repo folder (timm's config.json and model.safetensors)"
            )
        return found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(_HDF5_MAGIC):
        return KERAS_H5
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as e:
            raise WeightsError(f"{path!r} is a corrupt or truncated zip archive: {e}") from None
        if "config.json" in names and any(n.endswith(".weights.h5") for n in names):
            return KERAS
        if any(n.endswith("data.pkl") for n in names):
            return TIMM_TORCH
        if names and all(n.endswith(".npy") for n in names):
            return NPZ
        raise WeightsError(f"{path!r} is a zip archive but neither a .npz, a .keras nor a torch file")
    if len(head) >= 9 and head[8:9] == b"{":
        return TIMM_SAFETENSORS  # 8-byte little-endian header length, then a JSON header
    if head[:1] == b"\x80":
        raise WeightsError(
            f"{path!r} looks like a legacy pickled torch file; only zip-format torch files (torch >= 1.6) "
            f"are read, with weights_only=True. Re-save it with torch.save or convert it to .safetensors."
        )
    raise WeightsError(
        f"Unrecognised weights file {path!r}: expected an official .npz, a timm .pth/.safetensors, "
        f"a .keras or a .weights.h5 file"
    )


def folder_format(path):
    """PRESET_FOLDER (config.json names a registered Keras class, keras-hub's form), TIMM_FOLDER
    (timm's config.json, with `architecture`) or None, from the folder's config.json."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if "registered_name" in config:
        return PRESET_FOLDER
    return TIMM_FOLDER if "architecture" in config else None


def read_arrays(path, fmt=None):
    """Reads a non-Keras weights file: returns (format, {official key: array})."""
    fmt = fmt or detect_format(path)
    if fmt == NPZ:
        return fmt, _read_npz(path)
    if fmt == TIMM_SAFETENSORS:
        return fmt, timm_to_official(_read_safetensors(path))
    if fmt == TIMM_TORCH:
        return fmt, timm_to_official(_read_torch(path))
    raise WeightsError(f"{path!r} is a Keras file ({fmt}); open it with keras_mixer.weights_io.loader.WeightsFile")


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: np.asarray(data[key]) for key in data.files}
    except ValueError as e:  # numpy refuses object arrays without pickle
        raise WeightsError(f"{path!r} holds object arrays, which would need pickle; refused ({e})") from None
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise WeightsError(f"{path!r} is a corrupt or truncated .npz file: {e}") from None


def _read_safetensors(path):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path!r} is a corrupt or truncated .safetensors file: {e}") from None


def _read_torch(path):
    try:
        import torch
    except ImportError:
        raise ImportError(f"Reading the torch file {path!r} needs PyTorch (pip install torch)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files and refused pickles
        raise WeightsError(f"{path!r} could not be read as a torch state_dict: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path!r} holds a {type(state).__name__}, not a state_dict")
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


# timm name -> official name, for the parts that differ; block index carried by the regexes.
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|norm2|mlp_tokens|mlp_channels)\.(?:(fc1|fc2)\.)?(weight|bias)$")
_TIMM_TOP = {"stem.proj": "stem", "norm": "pre_head_layer_norm", "head": "head"}
_TIMM_PART = {
    "norm1": "LayerNorm_0",
    "norm2": "LayerNorm_1",
    "mlp_tokens": "token_mixing",
    "mlp_channels": "channel_mixing",
}
_TIMM_FC = {"fc1": "Dense_0", "fc2": "Dense_1"}


def _official_leaf(kind, timm_leaf):
    """timm `weight`/`bias` -> Flax `kernel`/`scale`/`bias` for a Dense, conv or LayerNorm."""
    if timm_leaf == "bias":
        return "bias"
    return "scale" if kind == "norm" else "kernel"


def timm_to_official(state):
    """Converts a timm Mixer state_dict ({name: array}) to official keys and layouts.

    Conv OIHW -> HWIO; Linear (out, in) -> (in, out); LayerNorm weight -> scale. Names that are not
    part of a timm Mixer are kept as they are, so the loader can list them as unexpected.
    """
    params = {}
    for name, value in state.items():
        value = np.asarray(value)
        block = _TIMM_BLOCK.match(name)
        if block:
            index, part, fc, leaf = block.groups()
            kind = "norm" if part.startswith("norm") else "dense"
            parts = [f"MixerBlock_{index}", _TIMM_PART[part]] + ([_TIMM_FC[fc]] if fc else [])
            key = "/".join(parts + [_official_leaf(kind, leaf)])
        else:
            prefix, _, leaf = name.rpartition(".")
            if prefix not in _TIMM_TOP or leaf not in ("weight", "bias"):
                params[name] = value
                continue
            kind = "norm" if prefix == "norm" else "dense"
            key = f"{_TIMM_TOP[prefix]}/{_official_leaf(kind, leaf)}"
        if key.endswith("/kernel"):
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        params[key] = np.ascontiguousarray(value)
    return params


def official_to_timm(params):
    """The inverse of `timm_to_official`: official keys and layouts -> a timm state_dict."""
    inverse_part = {v: k for k, v in _TIMM_PART.items()}
    inverse_top = {v: k for k, v in _TIMM_TOP.items()}
    inverse_fc = {v: k for k, v in _TIMM_FC.items()}
    state = {}
    for key, value in params.items():
        *scopes, leaf = key.split("/")
        timm_leaf = "bias" if leaf == "bias" else "weight"
        if scopes[0].startswith("MixerBlock_"):
            names = ["blocks", scopes[0].split("_")[1], inverse_part[scopes[1]]] + [inverse_fc[s] for s in scopes[2:]]
        else:
            names = [inverse_top[scopes[0]]]
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        state[".".join(names + [timm_leaf])] = np.ascontiguousarray(value)
    return state


def write_npz(params, path):
    """Writes {official key: array} as an official-layout .npz (no pickle), atomically."""
    atomic_write(path, lambda f: np.savez(f, **params))


def write_timm_safetensors(params, path):
    """Writes {official key: array} as a timm state_dict in .safetensors, atomically."""
    from safetensors.numpy import save

    state = official_to_timm(params)
    atomic_write(path, lambda f: f.write(save(state)))
