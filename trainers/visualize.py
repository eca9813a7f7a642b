"""Draws the first token-mixing layer's units of Mixer blocks on the patch grid (paper Fig. 5).

python trainers/visualize.py --source MODEL --out tokens.png
python trainers/visualize.py --helpshort
"""

import sys

try:
    from keras_mixer import programs
except ImportError as e:  # run from a checkout that was not installed
    sys.exit(f"error: {e}. Install the package first, from the checkout: pip install -e .")

if __name__ == "__main__":
    programs.visualize()
