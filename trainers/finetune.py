"""Fine-tunes a pre-trained Mixer (--init), at a new resolution if --image_size is larger.

python trainers/finetune.py --helpshort
"""

import sys

try:
    from keras_mixer import programs
except ImportError as e:  # run from a checkout that was not installed
    sys.exit(f"error: {e}. Install the package first, from the checkout: pip install -e .")

if __name__ == "__main__":
    programs.finetune()
