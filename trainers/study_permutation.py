"""The paper's permutation study (section 3.4): a Mixer and a ResNet trained on original, patch-
shuffled and pixel-shuffled images (default: the embedded digits, a few minutes on a CPU).

    python trainers/study_permutation.py --helpshort
"""

import sys

try:
    from keras_mixer import programs
except ImportError as e:  # run from a checkout that was not installed
    sys.exit(f"error: {e}. Install the package first, from the checkout: pip install -e .")

if __name__ == "__main__":
    programs.study_permutation()
