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

_pending = False  # a registration that must wait until the layers' module has run


def register():
    """Runs the modules whose classes a saved file can name (`@register_keras_serializable`): the
    layers, `MlpMixer` and the recipes' learning-rate schedule (in a compiled model's optimizer)."""
    global _pending
    try:
        from keras_mixer.model import layers, mixer  # noqa: F401  (importing them registers their classes)
    except ImportError:
        layers = sys.modules.get(LAYERS)
        if layers is None or not getattr(layers.__spec__, "_initializing", False):
            raise
        # Keras was first imported by the layers' own module, before its classes existed: the
        # model (which imports them) registers once that module has run (`_WATCHED`).
        _pending = True
        return
    from keras_mixer.training import schedules  # noqa: F401

    _pending = False


def _register_if_pending():
    if _pending:
        register()


LAYERS = "keras_mixer.model.layers"
# What to run right after a module's first import ends.
_WATCHED = {"keras": register, LAYERS: _register_if_pending}


def register_when_keras_loads():
    """Registers now if Keras is loaded, else right after `import keras` (once), wherever it
    happens: a user's `import keras`, TensorFlow's own import of Keras, or a load through tf.keras."""
    keras = sys.modules.get("keras")
    if keras is not None:
        if not getattr(getattr(keras, "__spec__", None), "_initializing", False):
            register()
        # else Keras is importing keras_mixer from inside its own import: nothing to do before it ends.
        return
    if not any(isinstance(finder, _ImportWatcher) for finder in sys.meta_path):
        watched = {name: run for name, run in _WATCHED.items() if name not in sys.modules}
        sys.meta_path.insert(0, _ImportWatcher(watched))


class _ImportWatcher(importlib.abc.MetaPathFinder):
    """Finds the watched modules as the other finders would, with a loader that runs their action
    once the module has run. It stays in place until each has loaded: a `find_spec("keras")` that
    only asks whether Keras is installed (TensorFlow's import does) loads nothing."""

    def __init__(self, watched):
        self.watched = dict(watched)
        self._asking = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.watched or self._asking:
            return None
        self._asking = True  # the question below goes to the other finders
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._asking = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RunAfter(spec.loader, self, fullname)
        return spec

    def ran(self, fullname):
        """The action of `fullname`, once; the watcher leaves when none is left."""
        action = self.watched.pop(fullname, None)
        if not self.watched and self in sys.meta_path:
            sys.meta_path.remove(self)
        return action


class _RunAfter(importlib.abc.Loader):
    """The module's own loader, then its action; the module keeps its own loader as `__loader__`."""

    def __init__(self, loader, watcher, fullname):
        self._loader, self._watcher, self._fullname = loader, watcher, fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self._loader
        action = self._watcher.ran(self._fullname)
        try:
            if action is not None:
                action()
        except Exception as e:  # never break the user's `import keras` over our registration
            warnings.warn(
                f"keras_mixer could not register its Keras classes ({type(e).__name__}: {e}); saved "
                f"keras_mixer models load only after `import keras_mixer.model.mixer`",
                stacklevel=2,
            )

    def __getattr__(self, name):  # anything else a caller asks of the loader (resources, source)
        return getattr(self._loader, name)
