"""Prints top-1 / top-5 of a SavedModel, .keras file or training checkpoint on a data set.

python trainers/evaluate.py --helpshort
"""

import sys

try:
    from keras_mixer import programs
except ImportError as e:  # run from a checkout that was not installed
    sys.exit(f"error: {e}. Install the package first, from the checkout: pip install -e .")

if __name__ == "__main__":
    programs.evaluate()
