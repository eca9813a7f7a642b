"""What a `--source` (or `weights=`, `--init`) string names: the one resolver every program uses.

    preset      a preset name ("mixer_b16_imagenet1k"), or a release ("imagenet21k") with a variant
    keras       a .keras file (the trainers' model.keras, or any saved MlpMixer)
    weights     another weights file: official .npz, timm .pth/.bin/.safetensors, .weights.h5
    preset_folder  a keras-hub preset folder (config.json, model.weights.h5, metadata.json)
    timm        a timm repo folder (timm's config.json and model.safetensors)
    workdir     a training workdir (holds run.json): its newest intact checkpoint
    checkpoint  one checkpoint of a workdir (WORKDIR/checkpoints/ckpt-N, the prefix of its files)
    export      a TF Serving SavedModel folder, or an export base holding numbered versions (the newest)

hf://org/name[@revision] and kaggle://owner/model/keras/variant[/version] are fetched into their
clients' caches (`keras_mixer.weights_io.hubs`) and are then the preset or timm folder there, named by the hub.
No TensorFlow here: what each kind is opened with lives with its users (`loader.open_weights` for
preset, keras, weights and the folders, and a finished workdir's model.keras;
`serving.trained_models` for all of them). They take what `resolve` found (a `Source`: `resolve`
gives one back as it is) and decide nothing about the string again.
"""

import dataclasses
import os
import re

from keras_mixer.weights_io import file_formats, hubs, presets

KINDS = ("preset", "keras", "weights", "preset_folder", "timm", "workdir", "checkpoint", "export")
# A training workdir's files (`training.workdir`): the recipe and architecture, the checkpoints'
# folder, the finished run's model.
RUN_RECORD, CHECKPOINTS, FINAL_MODEL = "run.json", "checkpoints", "model.keras"


@dataclasses.dataclass(frozen=True)
class Source:
    kind: str  # one of KINDS
    path: str  # the file, folder or checkpoint prefix; for a preset its full name
    name: str = None  # a model name the source gives (a hub model's), else None

    def __fspath__(self):  # a Source stands for its path where one is named (os.fspath)
        return self.path

    @property
    def workdir(self):
        """The training workdir of a workdir or checkpoint source (a checkpoint's is two folders
        up: WORKDIR/checkpoints/ckpt-N), else None."""
        if self.kind == "checkpoint":
            return os.path.dirname(os.path.dirname(os.path.abspath(self.path)))
        return self.path if self.kind == "workdir" else None

    def in_workdir(self, name):
        """WORKDIR/`name` (`RUN_RECORD`, `CHECKPOINTS`, `FINAL_MODEL`) of a workdir or checkpoint source."""
        return os.path.join(self.workdir, name)


def finished_run(found):
    """The "keras" `Source` of a workdir `Source` whose run finished (its model.keras), else None."""
    final = found.in_workdir(FINAL_MODEL) if found.kind == "workdir" else None
    return Source("keras", final) if final and os.path.isfile(final) else None


def resolve(source, variant=None):
    """The `Source` that `source` (a string or path) names; a `Source` is given back as it is.
    `variant` ("B/16") completes a release name. A name that exists as a file or folder is that
    path, not a preset.

    Raises FileNotFoundError (a path that is not there) or ValueError (a bare name that is neither
    a file or folder here nor a preset, a folder that is neither a workdir nor an export), each
    naming the kinds it could have been."""
    if isinstance(source, Source):
        return source
    path = os.fspath(source)
    if hubs.is_hub_uri(path):
        found = resolve(hubs.fetch(path), variant)
        if found.kind not in ("preset_folder", "timm"):
            raise ValueError(f"{path} holds neither a keras-hub preset folder nor a timm Mixer")
        return dataclasses.replace(found, name=_hub_name(path))
    if os.path.isfile(path):
        return Source("keras" if path.endswith(".keras") else "weights", path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, RUN_RECORD)):
            return Source("workdir", path)
        folder = file_formats.folder_format(path)
        if folder is not None:
            return Source("preset_folder" if folder == file_formats.PRESET_FOLDER else "timm", path)
        saved = saved_model_dir(path)
        if saved:
            return Source("export", saved)
        raise ValueError(
            f"folder {path!r} is neither a training workdir (it has no run.json), a keras-hub preset folder or timm "
            "repo folder (no config.json), nor a SavedModel or export base (no saved_model.pb in it or in a "
            "numbered version folder)"
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
        f"checkpoint (WORKDIR/checkpoints/ckpt-N), a SavedModel or export base, a preset folder, hf://org/name, "
        f"kaggle://owner/model/keras/variant, or a preset name ({', '.join(presets.PRESETS)})"
    )


def _hub_name(uri):
    """A model name from a hub name (letters, digits and _): hf://timm/mixer_b16_224.miil_in21k ->
    mixer_b16_224_miil_in21k; kaggle://owner/mixer/keras/b16_pets/2 -> b16_pets."""
    parts = uri.split("://", 1)[1].split("@")[0].split("/")
    return re.sub(r"\W", "_", parts[1] if uri.startswith(hubs.HF) else parts[3])


def export_versions(export_base):
    """The numbered version folders' numbers in a TF Serving export base, ascending ([] for none or
    for a path that is no folder)."""
    return sorted(int(d) for d in os.listdir(export_base) if d.isdigit()) if os.path.isdir(export_base) else []


def saved_model_dir(path):
    """`path` if it is a SavedModel folder, else its newest numbered version that is one, else None."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    for version in reversed(export_versions(path)):
        candidate = os.path.join(path, str(version))
        if os.path.isfile(os.path.join(candidate, "saved_model.pb")):
            return candidate
    return None
