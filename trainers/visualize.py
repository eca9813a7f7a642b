"""Draws the first token-mixing layer's units of Mixer blocks on the patch grid (paper Fig. 5).

python trainers/visualize.py --source MODEL --out tokens.png
python trainers/visualize.py --helpshort
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
try:
    from keras_mixer.studies import token_pictures_cli
except ImportError as e:  # run from a checkout that was not installed
    sys.exit(f"error: {e}. Install the package first, from the checkout: pip install -e .")

if __name__ == "__main__":
    token_pictures_cli.run()
