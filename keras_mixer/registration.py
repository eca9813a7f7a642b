"""keras_mixer's Keras classes registered whenever Keras is loaded, without `import keras_mixer`
loading Keras itself.

A saved `.keras` names its classes by their registered names (`keras_mixer>MlpMixer`), and
`keras.saving.load_model` finds them only in the registry that `@register_keras_serializable` fills
when the modules defining them run. `import keras_mixer` loads its names on first use (so that the
programs can quiet TensorFlow's start-up before Keras imports it), so nothing would run those
modules before a `load_model`. Here, `import keras_mixer` registers at once when Keras is already
loaded, and otherwise watches for Keras' import and registers right after it.

Standard library only: it runs inside `import keras_mixer`.
"""

import importlib.abc
import importlib.util
import sys
import warnings


def register():
    """Runs the modules whose classes a saved file can name (`@register_keras_serializable`): the
    layers, `MlpMixer` and the recipes' learning-rate schedule (in a compiled model's optimizer)."""
    from keras_mixer.model import layers, mixer  # noqa: F401  (importing them registers their classes)
    from keras_mixer.training import schedules  # noqa: F401


def register_when_keras_loads():
    """Registers now if Keras is loaded, else right after `import keras` (once), wherever it
    happens: a user's `import keras`, TensorFlow's own import of Keras, or a load through tf.keras."""
    keras = sys.modules.get("keras")
    if keras is not None:
        if not getattr(getattr(keras, "__spec__", None), "_initializing", False):
            register()
        # else Keras is importing keras_mixer from inside its own import: nothing to do before it ends.
        return
    if not any(isinstance(finder, _KerasWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _KerasWatcher())


class _KerasWatcher(importlib.abc.MetaPathFinder):
    """Finds `keras` as the other finders would, with a loader that registers once it has run.
    It stays in place until Keras has loaded: a `find_spec("keras")` that only asks whether Keras is
    installed (TensorFlow's import does) loads nothing."""

    def __init__(self):
        self._asking = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras" or self._asking:
            return None
        self._asking = True  # the question below goes to the other finders
        try:
            spec = importlib.util.find_spec("keras")
        finally:
            self._asking = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfter(spec.loader, self)
        return spec


class _RegisterAfter(importlib.abc.Loader):
    """Keras' own loader, then `register()`; the module keeps Keras' loader as its `__loader__`."""

    def __init__(self, loader, watcher):
        self._loader, self._watcher = loader, watcher

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader
        if self._watcher in sys.meta_path:
            sys.meta_path.remove(self._watcher)
        try:
            register()
        except Exception as e:  # never break the user's `import keras` over our registration
            warnings.warn(
                f"keras_mixer could not register its Keras classes ({type(e).__name__}: {e}); saved "
                f"keras_mixer models load only after `import keras_mixer.model.mixer`",
                stacklevel=2,
            )

    def __getattr__(self, name):  # anything else a caller asks of the loader (resources, source)
        return getattr(self._loader, name)
