"""TensorFlow's import with its C++ start-up lines left out, for the programs.

Those lines (oneDNN, "Could not find cuda drivers", "failed call to cuInit", absl's "All log
messages before absl::InitializeLog()", some twice) are written while `import tensorflow` runs,
before any log level applies to them, so standard error is held in a file for that import and what
else was written there is shown after it. TF_CPP_MIN_LOG_LEVEL defaults to 3 (its later lines off
too). `--verbose` or KERAS_MIXER_VERBOSE=1 shows everything, as TensorFlow would. Standard library
only: it runs before anything imports Keras (which imports TensorFlow on its TensorFlow backend).
"""

import importlib
import importlib.util
import os
import re
import sys
import tempfile

_STARTUP_LINE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\])"
)


def verbose(argv=None):
    """True when `--verbose` is on the command line or KERAS_MIXER_VERBOSE is set (not 0)."""
    argv = sys.argv if argv is None else argv
    return "--verbose" in argv or os.environ.get("KERAS_MIXER_VERBOSE", "0") not in ("", "0")


def quiet_import():
    """Imports TensorFlow (where installed) with its C++ start-up lines left out; other writes
    to standard error during the import are shown after it, in order."""
    if verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is None:
        return
    if os.environ.get("KERAS_BACKEND") == "torch":  # torch loaded after TensorFlow crashes (measured)
        return
    sys.stderr.flush()
    real = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            importlib.import_module("tensorflow")
        finally:
            sys.stderr.flush()
            os.dup2(real, 2)
            os.close(real)
            held.seek(0)
            kept = [line for line in held.read().splitlines(keepends=True) if not _STARTUP_LINE.match(line)]
            if kept:
                os.write(2, b"".join(kept))
