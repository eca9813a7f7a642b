"""The permutation study's default (`trainers/study_permutation.py`): the demo's small-images
recipe on the embedded digits, shown at 16 px to a T/4 Mixer (4x4 patches, a 4x4 token grid, the
same token count as the demo), 15 epochs per cell.

Why 16 px and not the digits' own 8: a T/4 keeps the demo's 4x4 token grid while the in-patch
pixel permutation acts on 16 pixels instead of 4, and the ResNet's 3x3 kernels see a stroke's
neighbourhood rather than most of the digit. Even so, digits need little locality: the ResNet's
loss under the global shuffle is small (docs/studies.md gives the table and the runs).
"""

from keras_mixer.configs import demo


def get_config():
    return {
        **demo.get_config(),
        "model": "T/4",
        "image_size": 16,
        "epochs": 15,
        "full_strength_epochs": None,  # the study's cells train with the same regularisation
        "workdir": "workdir/permutation",
    }
