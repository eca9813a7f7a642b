"""`python -m keras_mixer.training.export_main`: the export program (trainers/export.py) as a
module. Programs on Keras' JAX backend run it in a child process on the TensorFlow backend, since
a SavedModel is a TensorFlow graph and one process runs one Keras backend."""

from keras_mixer.training import cli

if __name__ == "__main__":
    cli.run_export()
