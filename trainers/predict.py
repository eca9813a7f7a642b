"""Labels image files and folders with a trained model: one line per image, its top-k labels and scores.

python trainers/predict.py --source workdir/demo photo.png more_photos/ [--format csv|json]

python trainers/predict.py --helpshort
"""

import sys

try:
    from keras_mixer import programs
except ImportError as e:  # run from a checkout that was not installed
    sys.exit(f"error: {e}. Install the package first, from the checkout: pip install -e .")

if __name__ == "__main__":
    programs.predict()
