"""`python -m keras_mixer.programs.export_program`: the export program (trainers/export.py) as a
module. Programs on Keras' JAX backend run it in a child process on the TensorFlow backend, since
a SavedModel is a TensorFlow graph and one process runs one Keras backend."""

from keras_mixer.programs import command_lines

if __name__ == "__main__":
    command_lines.run_export()
