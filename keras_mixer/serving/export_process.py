"""The TF Serving export of a finished .keras file in a process of its own, on Keras' TensorFlow
backend on the CPU: how a training run on Keras' JAX backend writes its export (a SavedModel is a
TensorFlow graph, and one process runs one Keras backend).

    python -m keras_mixer.serving.export_process MODEL.keras EXPORT_BASE VERSION PRECISION

The child reads what the model was trained on from the .keras file itself; a failure ends it with
one `error:` line, which `export_in_child` raises as one line.
"""

import os
import subprocess
import sys

from keras_mixer.data.sources import tensorflow_installed


def export_in_child(model_path, export_base, version, precision):
    """The export version folder of `model_path` (a .keras file written by `save_keras` with what
    it was trained on), written by a child process; without TensorFlow here: a note and None."""
    if not tensorflow_installed():
        print(
            f"TensorFlow is not installed here, so no TF Serving export was written. On a machine with it: "
            f"python trainers/export.py --source {model_path} --export_base {export_base}",
            flush=True,
        )
        return None
    command = [sys.executable, "-m", __name__, model_path, export_base, str(version), precision]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        why = lines[-1][len("error: ") :] if lines else result.stderr.strip()[-500:]
        raise OSError(f"the TF Serving export failed ({why}); model.keras is written: rerun the same command")
    return os.path.join(export_base, str(version))


def main(model_path, export_base, version, precision):
    """The export, as `trainers/export.py --source MODEL.keras` writes it."""
    from keras_mixer.model.mixer import MlpMixer
    from keras_mixer.serving.export import export_saved_model
    from keras_mixer.weights_io.loader import WeightsFile

    weights = WeightsFile(model_path)  # what it was trained on: the file's own record
    model = MlpMixer.from_preset(weights)
    export_saved_model(model, export_base, version=int(version), trained_on=weights.trained_on, precision=precision)


if __name__ == "__main__":
    try:
        main(*sys.argv[1:])
    except Exception as e:  # the parent reports it as one line
        sys.exit(f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
