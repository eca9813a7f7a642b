"""Fine-tunes a pre-trained Mixer (--init), at a new resolution if --image_size is larger.

    python trainers/finetune.py --helpshort
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from keras_mixer.training import cli  # noqa: E402

if __name__ == "__main__":
    cli.run_finetune()
