"""The programs' entry points: `trainers/*.py` and the `keras-mixer-*` console scripts.

Each runs its absl program (`training.cli.run_program`), which parses and checks the command line
before TensorFlow is imported (a typo is refused in a fraction of a second, not after the seconds
TensorFlow's import takes) and then imports it with its C++ start-up lines left out
(`tensorflow_start`). Standard library only: this runs before anything imports Keras (which
imports TensorFlow on its TensorFlow backend).
"""

import importlib


def _start(module, function):
    getattr(importlib.import_module(module), function)()


def pretrain():
    _start("keras_mixer.programs.command_lines", "run_pretrain")


def finetune():
    _start("keras_mixer.programs.command_lines", "run_finetune")


def evaluate():
    _start("keras_mixer.programs.command_lines", "run_evaluate")


def export():
    _start("keras_mixer.programs.command_lines", "run_export")


def predict():
    _start("keras_mixer.programs.command_lines", "run_predict")


def study_permutation():
    _start("keras_mixer.studies.permutation_cli", "run")


def visualize():
    _start("keras_mixer.studies.token_pictures_cli", "run")


def fewshot():
    _start("keras_mixer.studies.fewshot_cli", "run")
