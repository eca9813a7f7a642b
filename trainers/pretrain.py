"""Pre-trains a Mixer (default: the demo recipe, a small Mixer on the embedded digits set).

    python trainers/pretrain.py --helpshort
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from keras_mixer.training import cli  # noqa: E402

if __name__ == "__main__":
    cli.run_pretrain()
