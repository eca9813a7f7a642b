"""What a `--source` (or `weights=`, `--init`) string names: the one resolver every program uses.

    preset      a preset name ("mixer_b16_imagenet1k"), or a release ("imagenet21k") with a variant
    keras       a .keras file (the trainers' model.keras, or any saved MlpMixer)
    weights     another weights file: official .npz, timm .pth/.bin/.safetensors, .weights.h5
    workdir     a training workdir (holds run.json): its newest intact checkpoint
    checkpoint  one checkpoint of a workdir (WORKDIR/checkpoints/ckpt-N, the prefix of its files)
    export      a TF Serving SavedModel folder, or an export base holding numbered versions (the newest)

Only the file system is read here (no TensorFlow): what each kind is opened with lives with its users
(`loader.open_weights` for preset, keras and weights; `training.inference` for all of them).
"""

import dataclasses
import os

from keras_mixer import presets

KINDS = ("preset", "keras", "weights", "workdir", "checkpoint", "export")


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # one of KINDS
    path: str  # the file, folder or checkpoint prefix; for a preset its full name


def resolve(source, variant=None):
    """The `Source` that `source` (a string or path) names. `variant` ("B/16") completes a release
    name. A name that exists as a file or folder is that path, not a preset.

    Raises FileNotFoundError (a path that is not there) or ValueError (a bare name that is neither
    a file or folder here nor a preset, a folder that is neither a workdir nor an export), each
    naming the kinds it could have been."""
    path = os.fspath(source)
    if os.path.isfile(path):
        return Source("keras" if path.endswith(".keras") else "weights", path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "run.json")):
            return Source("workdir", path)
        saved = saved_model_dir(path)
        if saved:
            return Source("export", saved)
        raise ValueError(
            f"folder {path!r} is neither a training workdir (it has no run.json) nor a SavedModel or export base "
            "(no saved_model.pb in it or in a numbered version folder)"
        )
    if os.path.isfile(path + ".index"):
        return Source("checkpoint", path)
    if presets.is_preset_name(path):
        return Source("preset", presets.resolve(path, variant))
    if os.sep not in path and "." not in path:  # a bare name: a folder not here, or a preset misspelt
        raise ValueError(
            f"{path!r} is neither a file or folder (none by that name in {os.getcwd()}) nor a weights preset; "
            f"presets: {', '.join(presets.PRESETS)}"
        )
    raise FileNotFoundError(
        f"{path!r} does not exist: give a .keras file, a weights file (.npz, timm), a training workdir, a "
        f"checkpoint (WORKDIR/checkpoints/ckpt-N), a SavedModel or export base, or a preset name "
        f"({', '.join(presets.PRESETS)})"
    )


def saved_model_dir(path):
    """`path` if it is a SavedModel folder, else its newest numbered version that is one, else None."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = sorted((int(d) for d in os.listdir(path) if d.isdigit()), reverse=True) if os.path.isdir(path) else []
    for version in versions:
        candidate = os.path.join(path, str(version))
        if os.path.isfile(os.path.join(candidate, "saved_model.pb")):
            return candidate
    return None
