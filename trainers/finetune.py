"""Fine-tunes a pre-trained Mixer (--init), at a new resolution if --image_size is larger.

python trainers/finetune.py --helpshort
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
try:
    from keras_mixer.training import cli
except ImportError as e:  # run from a checkout that was not installed
    sys.exit(f"error: {e}. Install the package first, from the checkout: pip install -e .")

if __name__ == "__main__":
    cli.run_finetune()
