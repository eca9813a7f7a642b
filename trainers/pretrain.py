"""Pre-trains a Mixer (default: the demo recipe, a small Mixer on the embedded digits set).

python trainers/pretrain.py --helpshort
"""

import sys

try:
    from keras_mixer import programs
except ImportError as e:  # run from a checkout that was not installed
    sys.exit(f"error: {e}. Install the package first, from the checkout: pip install -e .")

if __name__ == "__main__":
    programs.pretrain()
