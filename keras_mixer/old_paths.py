"""Version 0.2's module paths, kept: `import keras_mixer.layers` (or any other module that moved
when the package was grouped by concern) gives the module at its new path, the same object, so
code written against the old paths keeps working and nothing is defined twice.

Standard library only: it runs inside `import keras_mixer`. A real module always wins: the finder
is asked last, only for names no file holds.
"""

import importlib
import importlib.abc
import importlib.util
import sys

OLD_PATHS = {
    "keras_mixer.layers": "keras_mixer.model.layers",
    "keras_mixer.models": "keras_mixer.model.mixer",
    "keras_mixer.variants": "keras_mixer.model.variants",
    "keras_mixer.applications": "keras_mixer.model.applications",
    "keras_mixer.kernels": "keras_mixer.model.fused_ops",
    "keras_mixer.resolution": "keras_mixer.model.resolution_expansion",
    "keras_mixer.preprocessing": "keras_mixer.model.pixels",
    "keras_mixer.precisions": "keras_mixer.model.precisions",
    "keras_mixer.cpu": "keras_mixer.model.cpu_units",
    "keras_mixer.trained_on": "keras_mixer.model.trained_on",
    "keras_mixer.weight_files": "keras_mixer.weights_io.file_formats",
    "keras_mixer.weights": "keras_mixer.weights_io.official_keys",
    "keras_mixer.loader": "keras_mixer.weights_io.loader",
    "keras_mixer.presets": "keras_mixer.weights_io.presets",
    "keras_mixer.timm_repos": "keras_mixer.weights_io.timm_repos",
    "keras_mixer.preset_folders": "keras_mixer.weights_io.preset_folders",
    "keras_mixer.hubs": "keras_mixer.weights_io.hubs",
    "keras_mixer.source_kinds": "keras_mixer.weights_io.source_kinds",
    "keras_mixer.imagenet": "keras_mixer.weights_io.imagenet_classes",
    "keras_mixer.jax_step": "keras_mixer.training.jax.step",
    "keras_mixer.export": "keras_mixer.serving.export",
    "keras_mixer.training.prediction": "keras_mixer.serving.label_files",
    "keras_mixer.training.inference": "keras_mixer.serving.trained_models",
    "keras_mixer.training.cli": "keras_mixer.programs.command_lines",
    "keras_mixer.tensorflow_start": "keras_mixer.programs.tensorflow_start",
    "keras_mixer.validation": "keras_mixer.argument_checks",
    "keras_mixer.files": "keras_mixer.atomic_files",
    "keras_mixer.training.step": "keras_mixer.training.tf.step",
    "keras_mixer.training.strategy": "keras_mixer.training.tf.strategy",
    "keras_mixer.training.cluster": "keras_mixer.training.tf.cluster",
    "keras_mixer.training.preemption": "keras_mixer.training.tf.preemption",
    "keras_mixer.training.evaluation": "keras_mixer.training.tf.evaluation",
    "keras_mixer.training.jax_evaluation": "keras_mixer.training.jax.evaluation",
    "keras_mixer.training.checkpointing": "keras_mixer.training.tf.checkpoints",
    "keras_mixer.training.orbax_store": "keras_mixer.training.jax.checkpoints",
    "keras_mixer.training.jax_loop": "keras_mixer.training.jax.engine",
    "keras_mixer.training.trainer": "keras_mixer.training",
}


def install():
    """Puts the finder of the old paths last in `sys.meta_path` (once)."""
    if not any(isinstance(finder, _OldPathFinder) for finder in sys.meta_path):
        sys.meta_path.append(_OldPathFinder())


class _OldPathFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = OLD_PATHS.get(fullname)
        return None if new is None else importlib.util.spec_from_loader(fullname, _Alias(new))


class _Alias(importlib.abc.Loader):
    """Hands the import system the module at its new path."""

    def __init__(self, new):
        self._new = new

    def create_module(self, spec):
        module = importlib.import_module(self._new)
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        # The import system has just pointed the module's __spec__ at the old name: give it back.
        module.__spec__ = self._spec
